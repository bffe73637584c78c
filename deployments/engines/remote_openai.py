"""The ``remote_openai`` engine: any OpenAI-compatible chat server, streamed over httpx.

Used for the frontier fallback (and for any model served elsewhere, e.g. a vLLM server).
Every answer is a streamed ``POST {base_url}/chat/completions`` (a raw prompt from
/v1/completions: ``POST {base_url}/completions``) with ``stream_options.include_usage``, so usage comes from the upstream and an early close of
our iterator closes the HTTP response, which is how the upstream learns to stop (abort).

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
import json
import math
import os
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, TypeVar

import httpx

from cluster.config import RemoteOpenAIEngineConfig
from cluster.errors import ConfigError, EngineError, EngineTimeoutError, EngineUnavailableError, SLMError
from cluster.capabilities import engine_params, refuse_unsupported
from cluster.types import (
    ChatMessage,
    EngineCapabilities,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    Usage,
)
from deployments.engines.common import messages_as_dicts, with_system_prompt

T = TypeVar("T")
Clock = Callable[[], float]

# Anything else (tool_calls, content_filter) ends the answer as "stop".
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_DRAIN_AFTER_DONE_S = 1.0  # what [DONE] may be followed by: just the end of the chunked body
_MESSAGE_LIMIT = 300  # upstream error text kept in our messages


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
        if request.prompt is not None:  # a raw prompt goes to the upstream's legacy /completions, as is
            messages: tuple[ChatMessage, ...] = ()
            response = await self._open(self._client, completions_payload(self.config.model, request), deadline, self._completions_url)
        else:
            messages = with_system_prompt(request, self.system_prompt)
            response = await self._open(self._client, self._payload(request, messages), deadline)
        try:
            lines = response.aiter_lines()
            events = SSEDecoder()
            answer = _Answer(request.sampling.logprobs)
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

    def _payload(self, request: GenerationRequest, messages: tuple[ChatMessage, ...]) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {"model": self.config.model, "messages": messages_as_dicts(messages),
                                "stream": True, "stream_options": {"include_usage": True},
                                "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
        # Optional fields only when used: some compatible servers reject nulls they do not know.
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.logprobs:
            body["logprobs"] = True
        body.update(optional_params(sampling))
        return body

    async def _open(self, client: httpx.AsyncClient, body: dict[str, Any], deadline: _Deadline, url: str | None = None) -> httpx.Response:
        """Sends the request and returns the streaming response once its status is 2xx;
        an error status is read, closed and raised as a typed error."""
        outgoing = client.build_request("POST", url or self._url, json=body, headers={"X-Request-ID": uuid.uuid4().hex})
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


# --- the stream --------------------------------------------------------------------------


class SSEDecoder:
    """Server-sent events, line by line (the parts of the WHATWG rules chat APIs use).

    ``data:`` lines gather until a blank line ends the event, joined by newlines; comments
    (``:`` lines, used as keep-alives) and the other fields (``event:``, ``id:``, ``retry:``)
    are skipped; one space after the colon is dropped.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """The event's data when ``line`` ends an event, else None."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """Data of an event the stream ended without a blank line after (lenient)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class _Answer:
    """Folds the stream's events into chunks and remembers the finish reason and usage."""

    def __init__(self, want_logprobs: bool) -> None:
        self.want_logprobs = want_logprobs
        self.done = False  # [DONE] seen
        self.finish: FinishReason | None = None
        self.finishes: dict[int, FinishReason] = {}  # by choice index (n > 1)
        self.usage: Usage | None = None
        self.deltas = 0

    def feed(self, data: str) -> list[GenerationChunk]:
        """The chunks in one event's data (one per choice with text or tool calls); raises ``EngineError`` for an error
        event or one it cannot read (upstream garbage is not our bug, so never a 500)."""
        if data.strip() == "[DONE]":
            self.done = True
            return []
        event = _json_object(data)
        if event.get("error") or event.get("object") == "error":  # OpenAI's shape, and older vLLM's
            raise EngineError(f"upstream error mid-stream: {_error_text(event)}", code="upstream_stream_error")
        try:
            return self._read_event(event)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise EngineError(f"upstream sent an unreadable event: {data[:_MESSAGE_LIMIT]!r}", code="upstream_bad_stream") from err

    def _read_event(self, event: dict[str, Any]) -> list[GenerationChunk]:
        if event.get("usage"):
            self.usage = _usage(event["usage"])
        chunks = []
        for choice in event.get("choices") or ():
            index = int(choice.get("index", 0))
            if choice.get("finish_reason"):
                self.finishes[index] = _FINISH.get(choice["finish_reason"], "stop")
                if index == 0:
                    self.finish = self.finishes[0]
            delta = choice.get("delta") or {}
            # chat streams put text in delta.content; legacy completion streams in choice.text
            text = delta.get("content") or choice.get("text") or ""
            calls = tuple(_tool_call(raw) for raw in delta.get("tool_calls") or ())
            logprobs = _logprobs(choice) if self.want_logprobs else ()
            if text or logprobs or calls:
                self.deltas += 1
                chunks.append(GenerationChunk(text=text, logprobs=logprobs, index=index, tool_calls=calls))
        return chunks

    def final(self, prompt_chars: int) -> GenerationChunk:
        """The last chunk. Without upstream usage the counts are estimates: prompt characters
        / 4 (the usual English ratio) and one token per streamed delta (servers stream about
        one token per event), which is what billing and metrics can get."""
        if self.finish is None:
            raise EngineError("upstream stream ended early (no finish_reason)", code="upstream_stream_truncated")
        usage = self.usage or Usage(prompt_tokens=max(1, math.ceil(prompt_chars / 4)), completion_tokens=self.deltas)
        reasons = tuple(self.finishes.get(i, "stop") for i in range(max(self.finishes) + 1)) if len(self.finishes) > 1 else ()
        return GenerationChunk(finish_reason=self.finish, usage=usage, finish_reasons=reasons)


def _json_object(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as err:
        raise EngineError(f"upstream sent malformed stream data: {data[:_MESSAGE_LIMIT]!r}", code="upstream_bad_stream") from err
    if not isinstance(event, dict):
        raise EngineError(f"upstream sent a non-object stream event: {data[:_MESSAGE_LIMIT]!r}", code="upstream_bad_stream")
    return event


def _usage(raw: Mapping[str, Any]) -> Usage:
    return Usage(prompt_tokens=int(raw.get("prompt_tokens") or 0), completion_tokens=int(raw.get("completion_tokens") or 0))


def completions_payload(model: str, request: GenerationRequest) -> dict[str, Any]:
    """The upstream ``/completions`` body for a raw prompt (``logprobs: 0``: the chosen
    tokens' logprobs, the legacy API's way of asking for them)."""
    sampling = request.sampling
    body: dict[str, Any] = {"model": model, "prompt": request.prompt, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.logprobs:
        body["logprobs"] = 0
    return body


def _logprobs(choice: Mapping[str, Any]) -> tuple[TokenLogprob, ...]:
    legacy = choice.get("logprobs") or {}
    if "tokens" in legacy:  # the completions API's shape: parallel lists
        return tuple(TokenLogprob(token=str(t), logprob=float(lp)) for t, lp in zip(legacy["tokens"], legacy["token_logprobs"]))
    content = (choice.get("logprobs") or {}).get("content") or ()
    return tuple(
        TokenLogprob(token=str(item["token"]), logprob=float(item["logprob"]),
                     top=tuple((str(t["token"]), float(t["logprob"])) for t in item.get("top_logprobs") or ()))
        for item in content
    )


def _tool_call(raw: Mapping[str, Any]) -> ToolCall:
    """One piece of a streamed tool call, as OpenAI sends it (id and name on the first)."""
    function = raw.get("function") or {}
    return ToolCall(index=int(raw.get("index", 0)), id=raw.get("id"), name=function.get("name"), arguments=function.get("arguments") or "")


def optional_params(sampling: SamplingParams) -> dict[str, Any]:
    """The optional OpenAI parameters a request uses, as the upstream takes them: passed
    through unchanged (cluster/capabilities.py lists them all for this engine)."""
    body: dict[str, Any] = {}
    if sampling.n > 1:
        body["n"] = sampling.n
    if sampling.top_logprobs:
        body["top_logprobs"] = sampling.top_logprobs
    if sampling.presence_penalty:
        body["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        body["frequency_penalty"] = sampling.frequency_penalty
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if sampling.tools:
        body["tools"] = list(sampling.tools)
    if sampling.tool_choice is not None:
        body["tool_choice"] = sampling.tool_choice
    if sampling.response_format is not None:
        body["response_format"] = sampling.response_format
    return body


# --- errors and time ---------------------------------------------------------------------


def status_error(status: int, body: bytes) -> SLMError:
    """The typed error for an upstream HTTP error status (see the module's table)."""
    detail = _error_text(_lenient_json(body)) or body.decode(errors="replace")[:_MESSAGE_LIMIT] or "no details"
    if status in (401, 403):
        # The upstream's text is left out: OpenAI echoes part of the key it rejected.
        return EngineError(f"upstream rejected our credentials (HTTP {status}); check api_key_env", code="upstream_auth_failed")
    if status == 429:
        return EngineUnavailableError(f"upstream rate-limited this cluster (HTTP 429): {detail}", code="upstream_rate_limited")
    if status in (408, 504):
        return EngineTimeoutError(f"upstream timed out (HTTP {status}): {detail}", code="upstream_timeout")
    if status == 503:
        return EngineUnavailableError(f"upstream unavailable (HTTP 503): {detail}", code="upstream_unavailable")
    if status >= 500:
        return EngineError(f"upstream failed (HTTP {status}): {detail}", code="upstream_server_error")
    return EngineError(f"upstream refused the request (HTTP {status}): {detail}", code="upstream_rejected_request")


def _lenient_json(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _error_text(payload: Mapping[str, Any]) -> str:
    error = payload.get("error", payload)
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:_MESSAGE_LIMIT] if message else ""


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

