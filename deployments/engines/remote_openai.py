"""The ``remote_openai`` engine: any OpenAI-compatible chat server, streamed over httpx.

Used for the frontier fallback (and for any model served elsewhere, e.g. a vLLM server).
Every answer is a streamed ``POST {base_url}/chat/completions`` (a raw prompt from
/v1/completions: ``POST {base_url}/completions``) with ``stream_options.include_usage``, so
usage comes from the upstream and an early close of our iterator closes the HTTP response,
which is how the upstream learns to stop (abort). This module does the HTTP, the deadline and
the transport errors; the bodies, the SSE stream and the status table's code are in
``deployments/engines/openai_wire.py``.

Error mapping (upstream -> ours, all raised):

- connect refused, DNS or TLS failure -> EngineUnavailableError 503
- any httpx timeout, or the total deadline; HTTP 408, 504 -> EngineTimeoutError 504
- HTTP 401, 403 -> EngineError 502 "upstream rejected our credentials"
- HTTP 429, 503 -> EngineUnavailableError 503 (retryable)
- HTTP 400, 404, other 4xx -> EngineError 502 with the upstream's message; other 5xx -> EngineError 502
- an ``{"error": ...}`` event, a lost connection, a stream that ends early -> EngineError 502

Why 401 and 429 are not passed through: they describe *our* account, not our client's
request. A 401 would tell a client with a valid key that its key is wrong; a 429 would tell
it to slow down when the cluster's quota ran out. A 429 is "unavailable now" (503) because
a retry, or another model, may well work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, TypeVar

import httpx

from cluster.capabilities import engine_params, refuse_unsupported
from cluster.config import RemoteOpenAIEngineConfig
from cluster.errors import ConfigError, EngineError, EngineTimeoutError, EngineUnavailableError, SLMError
from cluster.types import ChatMessage, EngineCapabilities, GenerationChunk, GenerationRequest
from deployments.engines.common import with_system_prompt

# The wire format lives in openai_wire; its names are re-exported here, where callers and
# tests have always found them.
from deployments.engines.openai_wire import (
    SSEDecoder,
    StreamAnswer,
    chat_payload,
    completions_payload,
    optional_params,
    status_error,
    unary,
)

__all__ = [
    "RemoteOpenAIEngine",
    "SSEDecoder",
    "StreamAnswer",
    "chat_payload",
    "completions_payload",
    "optional_params",
    "status_error",
]

_Answer = StreamAnswer  # the name older tests import

T = TypeVar("T")
Clock = Callable[[], float]

_DRAIN_AFTER_DONE_S = 1.0  # what [DONE] may be followed by: just the end of the chunked body


class RemoteOpenAIEngine:
    """An ``Engine`` over an OpenAI-compatible ``/chat/completions`` endpoint.

    ``env`` (``os.environ`` by default) is read once, in ``start()``, for the API key named
    by ``config.api_key_env``. ``clock`` measures the ``total_timeout_s`` deadline; tests
    inject one to expire it without waiting.
    """

    capabilities = EngineCapabilities(streaming=True, logprobs=True, raw_prompt=True, params=engine_params("remote_openai"))

    def __init__(self, config: RemoteOpenAIEngineConfig, *, system_prompt: str | None = None,
                 env: Mapping[str, str] | None = None, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.system_prompt = system_prompt
        self._env = os.environ if env is None else env
        self._clock = clock
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._completions_url = config.base_url.rstrip("/") + "/completions"  # raw prompts (/v1/completions)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Checks the URL and the API key and opens the connection pool; raises
        ``ConfigError`` for a bad base_url or a missing key. Does not call the upstream:
        an upstream outage must not stop replicas from starting. Idempotent."""
        if self._client is not None:
            return
        url = httpx.URL(self.config.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"remote_openai base_url must be an http(s) URL, got {self.config.base_url!r}", param="base_url")
        cfg = self.config
        self._client = httpx.AsyncClient(
            headers=self._auth_headers(),
            # read bounds every wait for bytes, so it is also the first-token and stall limit;
            # a wait for a pooled connection is bounded by the whole-answer deadline.
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=cfg.read_timeout_s, pool=cfg.total_timeout_s
            ),
            limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections),
            # Proxies and CA bundles come from config, never from the environment (habit 2);
            # it also keeps loopback test traffic off any proxy the machine names.
            trust_env=False,
        )

    async def shutdown(self) -> None:
        """Closes the pool (which also cuts any stream still open). Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def check_health(self) -> None:
        """Raises ``EngineUnavailableError`` unless started and not shut down.

        Deliberately never calls the upstream: Serve runs this every few seconds on every
        replica, and paid APIs bill or rate-limit such probes. Nor do upstream failures make
        a replica unhealthy: restarting a replica cannot fix a remote outage, and each
        failing request already raises a typed, retryable 502/503/504 that the strategies
        fall back on.
        """
        if self._client is None or self._client.is_closed:
            raise EngineUnavailableError("remote_openai engine is not started")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Streams the upstream's answer: text chunks in order, then one final chunk with
        ``finish_reason`` and ``usage``. Closing the iterator early (or cancelling the
        consumer) closes the HTTP response, so the upstream sees the disconnect and stops."""
        if self._client is None:
            raise EngineUnavailableError("remote_openai engine is not started")
        refuse_unsupported(self.capabilities, request, "remote_openai")
        deadline = _Deadline(self._clock, self.config.total_timeout_s)
        # A caller that takes only the whole answer gets it as one JSON body: one read and one
        # parse instead of an event (and a timed read) per token.
        shape = unary if request.whole_answer else (lambda body: body)
        if request.prompt is not None:  # a raw prompt goes to the upstream's legacy /completions, as is
            messages: tuple[ChatMessage, ...] = ()
            response = await self._open(self._client, shape(completions_payload(self.config.model, request)), deadline,
                                        self._completions_url, request_id=request.request_id)
        else:
            messages = with_system_prompt(request, self.system_prompt)
            response = await self._open(self._client, shape(chat_payload(self.config.model, request, messages)), deadline,
                                        request_id=request.request_id)
        try:
            answer = StreamAnswer(request.sampling.logprobs)
            if request.whole_answer:
                for chunk in answer.feed_completion(await _read(deadline, response.aread, "reading the answer")):
                    yield chunk
            else:
                lines = response.aiter_lines()
                events = SSEDecoder()
                while not answer.done:
                    line = await _read(deadline, lambda: anext(lines, None), "reading the stream")
                    data = events.feed(line) if line is not None else events.flush()
                    for chunk in answer.feed(data) if data is not None else ():
                        yield chunk
                    if line is None:
                        break
                if answer.done:
                    await _drain(lines, deadline)
            yield answer.final(prompt_chars=sum(len(m.content) for m in messages) + len(request.prompt or ""))
        finally:
            await response.aclose()

    # --- request ----------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        name = self.config.api_key_env
        if name is None:
            return {}
        key = self._env.get(name, "").strip()
        if not key:
            raise ConfigError(f"remote_openai: env var {name} (named by api_key_env) is not set or empty", param="api_key_env")
        return {"Authorization": f"Bearer {key}"}

    async def _open(self, client: httpx.AsyncClient, body: dict[str, Any], deadline: _Deadline, url: str | None = None,
                    *, request_id: str = "") -> httpx.Response:
        """Sends the request and returns the streaming response once its status is 2xx;
        an error status is read, closed and raised as a typed error."""
        outgoing = client.build_request("POST", url or self._url, json=body, headers={"X-Request-ID": upstream_request_id(request_id)})
        response = await _read(deadline, lambda: client.send(outgoing, stream=True), "connecting")
        if response.is_success:
            return response
        try:
            raw = await _read(deadline, response.aread, "reading an error response")
        except SLMError:
            raw = b""  # the status alone still says what went wrong
        finally:
            await response.aclose()
        raise status_error(response.status_code, raw)


# --- time and transport ------------------------------------------------------------------

# What an upstream's logs can carry: the gateway's own id for the call (``<request id>:<deployment>``,
# the audit line's request_id plus the model), so the two can be matched; a fresh one otherwise.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")


def upstream_request_id(request_id: str) -> str:
    return request_id if _SAFE_ID.fullmatch(request_id) else uuid.uuid4().hex



class _Deadline:
    """The whole answer's time budget (``total_timeout_s``), read from an injectable clock."""

    def __init__(self, clock: Clock, budget_s: float) -> None:
        self._clock = clock
        self._budget_s = budget_s
        self._at = clock() + budget_s

    def left(self) -> float:
        return self._at - self._clock()

    def expired(self) -> EngineTimeoutError:
        return EngineTimeoutError(f"upstream answer exceeded total_timeout_s={self._budget_s:g}", code="upstream_timeout")


async def _read(deadline: _Deadline, step: Callable[[], Awaitable[T]], phase: str, cap_s: float | None = None) -> T:
    """Awaits one network step within the deadline (and ``cap_s``), translating transport
    failures into typed errors. The step is a factory so nothing starts once time is up."""
    left = deadline.left() if cap_s is None else min(cap_s, deadline.left())
    if left <= 0:
        raise deadline.expired()
    try:
        with _transport_errors(phase):
            return await _within(left, step())
    except (TimeoutError, asyncio.TimeoutError) as err:  # the deadline's own expiry (distinct classes before 3.11)
        raise deadline.expired() from err


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    # asyncio.timeout (3.11+) scopes the wait to this one step in the caller's task; it is
    # never held across a yield, so it cannot fire into the consumer's code.
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


@contextlib.contextmanager
def _transport_errors(phase: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as err:  # connect, read, write or pool: before ConnectError on purpose
        raise EngineTimeoutError(f"upstream timed out while {phase} ({type(err).__name__})", code="upstream_timeout") from err
    except httpx.ConnectError as err:
        raise EngineUnavailableError(f"cannot connect to the upstream: {err}", code="upstream_unreachable") from err
    except httpx.TransportError as err:
        message = f"upstream connection failed while {phase}: {type(err).__name__}: {err}"
        raise EngineError(message, code="upstream_connection_lost") from err


async def _drain(lines: AsyncIterator[str], deadline: _Deadline) -> None:
    """Reads what follows ``[DONE]`` (normally only the end of the chunked body) so the
    connection returns to the pool instead of being closed. The answer is complete by
    now, so a failure here is ignored, and a server that lingers gets a short cap."""
    with contextlib.suppress(SLMError):
        while await _read(deadline, lambda: anext(lines, None), "draining", cap_s=_DRAIN_AFTER_DONE_S) is not None:
            pass

