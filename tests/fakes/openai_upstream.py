"""A real OpenAI-compatible chat server for tests: uvicorn on 127.0.0.1 in a background thread.

It serves ``POST /v1/chat/completions`` (SSE stream or one JSON answer) on a free loopback
port, so adapters and gateways are tested over real HTTP, with no patching::

    with OpenAIUpstream(answer="Hello there", token_delay_s=0.01) as upstream:
        config = RemoteOpenAIEngineConfig(kind="remote_openai", base_url=upstream.base_url, model="m")
        ...
        upstream.knobs.status = 503      # knobs may change between requests
        assert upstream.completed == 1

As a pytest fixture (it runs in its own thread and loop, so any test loop may use it)::

    @pytest.fixture
    def upstream():
        with OpenAIUpstream() as up:
            yield up

Knobs (``UpstreamKnobs``, the constructor's keyword arguments, mutable as ``upstream.knobs``):
the answer (fixed, or derived from the prompt), delays, a forced error status, a required
API key, and a stream that fails after N tokens by hang-up, error event or early end.

Counters (the server thread updates them): ``requests``, ``completed`` (answers sent to the
end), ``disconnected`` (requests whose client went away before the end: what an engine's
abort looks like from the upstream), ``last_authorization`` (the Authorization header of the
last request), ``last_body`` (its parsed JSON) and ``bodies`` (every request's, in order:
what a recording upstream saw). All but ``disconnected`` are updated
before the client can have read the whole response; ``disconnected`` a moment after the
client leaves, so poll for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

import uvicorn

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

_WORDS = "small models answer most questions quickly while larger experts take the hard ones".split()
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class UpstreamKnobs:
    answer: str | None = None  # fixed answer, streamed word by word; None derives one from the prompt
    answer_tokens: int = 16  # length of a prompt-derived answer, in word tokens
    first_byte_delay_s: float = 0.0  # before the response starts (status line included)
    token_delay_s: float = 0.0  # between two streamed tokens
    status: int | None = None  # answer every request with this HTTP status and an OpenAI error body
    error_message: str = "forced failure"  # the message of that body (and of a mid-stream error event)
    api_key: str | None = None  # when set, a request without "Bearer <api_key>" gets a 401
    send_usage: bool = True  # honour stream_options.include_usage; False acts as a server without usage
    fail_after_tokens: int | None = None  # break the stream after this many tokens, as `failure` says:
    failure: Literal["hangup", "error_event", "eof"] = "hangup"  # drop TCP / send {"error"} / end without [DONE]


class _HangUp(Exception):
    """Raised inside the app so uvicorn drops the connection mid-body (a crashed upstream)."""


class OpenAIUpstream:
    """The fake server. ``start()``/``stop()`` or use it as a context manager."""

    def __init__(self, **knobs: Any) -> None:
        self.knobs = UpstreamKnobs(**knobs)
        self.requests = 0
        self.completed = 0
        self.disconnected = 0
        self.last_authorization: str | None = None
        self.last_body: dict[str, Any] | None = None
        self.bodies: list[dict[str, Any]] = []
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The API root to configure clients with, e.g. ``http://127.0.0.1:40123/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "OpenAIUpstream":
        """Binds a free loopback port and returns once the server accepts connections."""
        if self._server is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        # log_config=None leaves the test process's logging alone; the hang-up knob makes
        # uvicorn log an "Exception in ASGI application" that is expected, hence critical.
        config = uvicorn.Config(self, lifespan="off", http="h11", log_config=None, log_level="critical",
                                access_log=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"openai-upstream-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI upstream did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stops the server and joins its thread; safe to call twice."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> "OpenAIUpstream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the ASGI app ----------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/chat/completions":
            await _send_json(send, 404, _error_body(404, f"no route {scope['method']} {scope['path']}"))
            return
        raw = await _read_body(receive)
        if raw is None:  # the client left before sending the whole request
            return
        body = json.loads(raw or b"{}")
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests += 1
        self.last_body = body
        self.bodies.append(body)
        self.last_authorization = headers.get("authorization")
        knobs = dataclasses.replace(self.knobs)  # a snapshot: a test may change knobs meanwhile
        await self._until_disconnect(receive, self._respond(knobs, body, self.last_authorization, send))

    async def _until_disconnect(self, receive: Receive, work: Awaitable[None]) -> None:
        """Runs the response while watching for the client going away; a departure cancels
        the response and counts in ``disconnected`` (Starlette does the same, but only for
        some ASGI versions, and the counter must be exact for the abort contract)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task in done:  # checked first: uvicorn also reports "disconnect" once a response is complete
            task.result()  # re-raises _HangUp, so that uvicorn drops the connection
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.disconnected += 1

    async def _respond(self, knobs: UpstreamKnobs, body: dict[str, Any], auth: str | None, send: Send) -> None:
        """Sends one whole response. ``completed`` counts a successful answer just before its
        last bytes go out, so a client that has read the whole answer sees the count."""
        await asyncio.sleep(knobs.first_byte_delay_s)
        status = knobs.status
        if status is None and knobs.api_key is not None and auth != f"Bearer {knobs.api_key}":
            status = 401
        if status is not None:
            await _send_json(send, status, _error_body(status, knobs.error_message))
            return
        tokens, finish = _answer(knobs, body)
        if body.get("stream"):
            await _stream(send, knobs, body, tokens, finish, self._count_completed)
            return
        self._count_completed()
        await _send_json(send, 200, _completion(body, tokens, finish))

    def _count_completed(self) -> None:
        self.completed += 1


# --- the answer ----------------------------------------------------------------------


def _answer(knobs: UpstreamKnobs, body: dict[str, Any]) -> tuple[list[str], str]:
    """(tokens to send, finish_reason): the natural answer, cut by max_tokens or a stop string."""
    if knobs.answer is not None:
        words = knobs.answer.split(" ")
    else:
        rng = random.Random(hashlib.sha256(_prompt(body).encode()).digest())
        words = [rng.choice(_WORDS) for _ in range(knobs.answer_tokens)]
    natural = [(" " if i else "") + w for i, w in enumerate(words)]
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or 1 << 30)
    tokens: list[str] = []
    for token in natural:
        if any(s in "".join(tokens) + token for s in stops):
            return tokens, "stop"
        if len(tokens) == limit:
            return tokens, "length"
        tokens.append(token)
    return tokens, "stop"


def _prompt(body: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


def _usage(body: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    prompt = max(1, len(_prompt(body).split()))
    return {"prompt_tokens": prompt, "completion_tokens": len(tokens), "total_tokens": prompt + len(tokens)}


def _logprobs(body: dict[str, Any], tokens: list[str], start: int) -> dict[str, Any] | None:
    if not body.get("logprobs"):
        return None
    return {"content": [{"token": t, "logprob": -0.1 * (1 + (start + i) % 5), "bytes": list(t.encode()), "top_logprobs": []}
                        for i, t in enumerate(tokens)]}


def _completion(body: dict[str, Any], tokens: list[str], finish: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(tokens)}
    choice = {"index": 0, "message": message, "logprobs": _logprobs(body, tokens, 0), "finish_reason": finish}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"), "choices": [choice], "usage": _usage(body, tokens)}


# --- streaming -----------------------------------------------------------------------


async def _stream(send: Send, knobs: UpstreamKnobs, body: dict[str, Any], tokens: list[str], finish: str,
                  completed: Callable[[], None]) -> None:
    """Streams the answer as OpenAI does: a role chunk, one chunk per token, a finish chunk,
    a usage chunk when asked, then ``[DONE]``. The failure knobs cut it short."""
    include_usage = knobs.send_usage and bool((body.get("stream_options") or {}).get("include_usage"))
    usage_field = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "fake"), "choices": [choice], **usage_field}

    await _start(send, 200, "text/event-stream")
    await _event(send, chunk({"role": "assistant", "content": ""}))
    for i, token in enumerate(tokens):
        if knobs.fail_after_tokens is not None and i == knobs.fail_after_tokens:
            await _break(send, knobs)
            return
        if i and knobs.token_delay_s:
            await asyncio.sleep(knobs.token_delay_s)
        await _event(send, chunk({"content": token}, logprobs=_logprobs(body, [token], i)))
    if knobs.fail_after_tokens is not None and knobs.fail_after_tokens >= len(tokens):
        await _break(send, knobs)
        return
    await _event(send, chunk({}, reason=finish))
    if include_usage:
        await _event(send, {**chunk({}), "choices": [], "usage": _usage(body, tokens)})
    completed()
    await _body(send, b"data: [DONE]\n\n", more=False)


async def _break(send: Send, knobs: UpstreamKnobs) -> None:
    if knobs.failure == "hangup":
        raise _HangUp()
    if knobs.failure == "error_event":
        await _event(send, _error_body(500, knobs.error_message))
    await _body(send, b"", more=False)


# --- ASGI plumbing -------------------------------------------------------------------


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error")
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _read_body(receive: Receive) -> bytes | None:
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _start(send: Send, status: int, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"cache-control", b"no-cache")]})


async def _body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _event(send: Send, payload: dict[str, Any]) -> None:
    await _body(send, b"data: " + json.dumps(payload).encode() + b"\n\n", more=True)


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    await _start(send, status, "application/json")
    await _body(send, json.dumps(payload).encode(), more=False)
