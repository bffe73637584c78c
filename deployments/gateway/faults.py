"""What a model call survives: a replica that dies before the first chunk (retried once on
another replica) and a failing frontier (its circuit breaker). docs/faults.md says what is
retried and what is not.

Both are wrappers around a call's chunk stream (``Ensemble._open`` stacks them); neither
buffers, and closing either closes the stream inside, which cancels the replica's work.
"""

from __future__ import annotations

import math
from typing import Any, AsyncIterator, Callable

from cluster.breaker import CircuitBreaker
from cluster.errors import CircuitOpenError, ReplicaGoneError, SLMError, find_slm_error
from cluster.types import GenerationChunk

Chunks = AsyncIterator[GenerationChunk]

# Ray's errors for "the replica actor is gone or cannot be reached", by class name (their
# import paths move between Ray releases). Serve's router drops such a replica from its
# choices when it sees the error, so the retry goes to another one. Not in the list, so
# never retried: a full queue (BackPressureError: the retry would only add load), a lost
# object, a timeout, the engine's own errors (it answered: it is alive), client errors.
_REPLICA_GONE = {
    "RayActorError": "The model replica died while serving the request.",
    "ActorDiedError": "The model replica died while serving the request.",
    "ActorUnavailableError": "The model replica is unreachable.",
}


def replica_gone(exc: BaseException) -> ReplicaGoneError | None:
    """The typed error when ``exc`` means the replica died or is unreachable, else None."""
    if isinstance(exc, ReplicaGoneError):
        return exc
    if find_slm_error(exc) is not None:
        return None  # the replica's own typed error (a RayTaskError wrapping it): it is alive
    for cls in type(exc).__mro__:
        if cls.__name__ in _REPLICA_GONE:
            return ReplicaGoneError(_REPLICA_GONE[cls.__name__])
    return None


async def retry_once(open_: Callable[[], Chunks], on_retry: Callable[[ReplicaGoneError], None]) -> Chunks:
    """The chunks of ``open_()``. When the replica is gone before the first chunk, the call
    is opened once more (``on_retry`` is told) and its chunks follow. Never after a chunk:
    the client may have the tokens already, and a second answer would not continue the
    first. The retry is a new call with its own deadlines (``timed_chunks``), so a request
    whose replica dies may wait up to twice the first-token limit. A replica that dies after
    a chunk (or on the retry too) raises ``ReplicaGoneError`` (503)."""
    chunks = open_()
    try:
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:  # noqa: BLE001 - only "replica gone" is retried; the rest re-raised
            gone = replica_gone(exc)
            if gone is None:
                raise
            await chunks.aclose()  # type: ignore[attr-defined]
            on_retry(gone)
            chunks = open_()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                return
        yield first
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - typed here so every layer above sees our error
        gone = replica_gone(exc)
        if gone is None or gone is exc:
            raise
        raise gone from exc
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _is_failure(exc: BaseException) -> bool:
    """A server-side failure of the upstream (5xx, timeouts, a dead replica, an unknown
    error); a client error (4xx) says nothing about the upstream's health."""
    err = find_slm_error(exc)
    return err is None or err.http_status >= 500


async def breaker_guarded(breaker: CircuitBreaker, clock: Callable[[], float], open_: Callable[[], Chunks]) -> Chunks:
    """The chunks of ``open_()`` when the breaker lets the call through, else
    ``CircuitOpenError`` at once (nothing is opened). The call's end is the breaker's
    verdict: a final chunk is a success, a server-side failure a failure; a cancelled call
    or a client error releases a half-open trial without one. The breaker is consulted when
    the stream is first read, so a call cancelled before it ever ran takes no trial."""
    wait = breaker.acquire(clock())
    if wait > 0:
        raise CircuitOpenError(
            f"The frontier model is failing; its circuit breaker is open. Retry in {math.ceil(wait)} s.", retry_after_s=wait
        )
    chunks = open_()
    verdict: bool | None = None
    try:
        async for chunk in chunks:
            if chunk.is_final:
                verdict = True  # before the yield: the consumer stops after the final chunk
            yield chunk
    except Exception as exc:  # noqa: BLE001 - judged, then re-raised unchanged
        if _is_failure(exc):
            verdict = False
        raise
    finally:
        now = clock()
        if verdict is True:
            breaker.success(now)
        elif verdict is False:
            breaker.failure(now)
        else:
            breaker.release(now)
        await chunks.aclose()  # type: ignore[attr-defined]


def retry_after_headers(err: SLMError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for an error that says when to come back."""
    seconds: Any = getattr(err, "retry_after_s", None)
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        return {}
    return {"retry-after": str(max(1, math.ceil(seconds)))}
