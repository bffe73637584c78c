"""Pull a model call's chunk stream under the gateway's deadlines.

The stream is a ModelServer's, over a ``DeploymentHandle`` (Serve's streaming response),
or an in-gateway model's (``deployments.in_gateway``): both hand out lists of chunks and
cancel the generation with ``cancel()``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Protocol, TypeVar

from ray.serve.handle import DeploymentHandle

from cluster.config import GatewayConfig
from cluster.deadlines import StreamDeadlines
from cluster.errors import EngineError, EngineTimeoutError
from cluster.types import GenerationChunk, GenerationRequest


T = TypeVar("T")


async def within(call: Awaitable[T], timeout_s: float) -> T:
    """An awaitable's result (a unary handle call's ``DeploymentResponse``, a stream's next
    item) under a timeout; ``asyncio.TimeoutError`` when it runs past. The gateway's router,
    embedder and readiness calls and every pull of a model's stream wait this one way.

    ``asyncio.timeout`` waits in the caller's own task. ``asyncio.wait_for`` (before Python
    3.12) wraps the awaitable in a new task each time, one task creation and one more loop
    wake-up per pull of every call, on the front door's hottest path."""
    async with asyncio.timeout(timeout_s):
        return await call


class BatchStream(Protocol):
    """What ``timed_chunks`` pulls: lists of chunks, and a way to abort the generation."""

    def __anext__(self) -> Awaitable[list[GenerationChunk]]: ...

    def cancel(self) -> None: ...


def handle_stream(handle: DeploymentHandle, request: GenerationRequest) -> BatchStream:
    """A streaming call to a ModelServer replica (Serve picks the replica)."""
    return handle.options(stream=True).generate.remote(request)  # type: ignore[no-any-return]


async def timed_chunks(
    open_stream: Callable[[], BatchStream],
    gw: GatewayConfig,
    clock: Callable[[], float],
    whole: bool = False,
) -> AsyncIterator[GenerationChunk]:
    """Yield chunks up to and including the final one.

    Raises ``EngineTimeoutError`` when the first token, a later token or the whole answer
    is late, and ``EngineError`` when the stream ends without a final chunk. However it
    ends early (timeout, error, or the consumer closing this generator), the replica-side
    generation is cancelled, which aborts it in the engine. The call is opened on the
    first pull, not before: a call that is never read never runs (nor needs cancelling).
    For a ``whole`` answer (``GenerationRequest.whole_answer``) the first chunk may come only
    with the last, so the first-token limit is the whole answer's.
    """
    stream = open_stream()
    first_token_s = gw.request_timeout_s if whole else gw.first_token_timeout_s
    deadlines = StreamDeadlines(clock(), gw.request_timeout_s, first_token_s, gw.stream_idle_timeout_s)
    last_at: float | None = None
    finished = False
    try:
        while True:
            wait, what = deadlines.next_wait(clock(), last_at)
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                batch = await within(stream.__anext__(), wait)
            except StopAsyncIteration:
                raise EngineError("The model's stream ended before its final chunk.") from None
            except asyncio.TimeoutError:
                raise EngineTimeoutError(f"The model did not produce the {what} in time.") from None
            last_at = clock()
            for chunk in batch:  # the ModelServer sends chunks in lists
                yield chunk
                if chunk.is_final:
                    finished = True
                    return
    finally:
        if not finished:
            stream.cancel()
