"""A real OpenAI-compatible chat server for tests: uvicorn on 127.0.0.1 in a background thread.

It serves ``POST /v1/chat/completions`` and the legacy ``POST /v1/completions`` (SSE
stream or one JSON answer) on a free loopback
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

Requests drive the answer's shape as OpenAI's would: ``n`` choices (each with its index,
usage counting them all), ``top_logprobs`` alternatives, and a forced tool call when
``tool_choice`` is ``required`` or names a function (``weather``-style fixed arguments,
streamed in two pieces: id, type and name first, then the arguments).

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
        self.request_ids: list[str | None] = []  # each request's X-Request-ID header, in order
        self.paths: list[str] = []  # each request's path, in order (/v1/chat/completions or /v1/completions)
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
        path = scope["path"].rstrip("/")
        if scope["method"] != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
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
        self.request_ids.append(headers.get("x-request-id"))
        self.paths.append(path)
        knobs = dataclasses.replace(self.knobs)  # a snapshot: a test may change knobs meanwhile
        respond = self._respond_text if path == "/v1/completions" else self._respond
        await self._until_disconnect(receive, respond(knobs, body, self.last_authorization, send))

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

    async def _respond_text(self, knobs: UpstreamKnobs, body: dict[str, Any], auth: str | None, send: Send) -> None:
        """The legacy ``/v1/completions``: the same answer knobs, in the text_completion shape."""
        await asyncio.sleep(knobs.first_byte_delay_s)
        status = knobs.status
        if status is None and knobs.api_key is not None and auth != f"Bearer {knobs.api_key}":
            status = 401
        if status is not None:
            await _send_json(send, status, _error_body(status, knobs.error_message))
            return
        tokens, finish = _answer(knobs, body)
        if body.get("stream"):
            await _stream_text(send, knobs, body, tokens, finish, self._count_completed)
            return
        self._count_completed()
        choice = {"text": "".join(tokens), "index": 0, "logprobs": _text_logprobs(body, tokens, 0), "finish_reason": finish}
        await _send_json(send, 200, {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                                     "model": body.get("model", "fake"), "choices": [choice], "usage": _usage(body, tokens)})


# --- the answer ----------------------------------------------------------------------


def _answer(knobs: UpstreamKnobs, body: dict[str, Any]) -> tuple[list[str], str]:
    """(tokens to send, finish_reason): the natural answer, cut by max_tokens or a stop
    string; no tokens and ``tool_calls`` when the request forces a tool call."""
    if _tool_call(body) is not None:
        return [], "tool_calls"
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
    if isinstance(body.get("prompt"), str):  # /v1/completions
        return body["prompt"]
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The call a request forces (``tool_choice`` ``required``: the first tool; a named
    function: that one), with fixed arguments; None when the model may answer in text."""
    choice, tools = body.get("tool_choice"), body.get("tools") or []
    if not tools or choice in (None, "none", "auto"):
        return None
    name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
    return {"id": "call_upstream_1", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}


def _choices(body: dict[str, Any]) -> int:
    return int(body.get("n") or 1)


def _usage(body: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    prompt = max(1, len(_prompt(body).split()))
    completion = len(tokens) * _choices(body)  # every choice counts
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(body: dict[str, Any], tokens: list[str], start: int) -> dict[str, Any] | None:
    if not body.get("logprobs"):
        return None
    top = int(body.get("top_logprobs") or 0)

    def entry(i: int, t: str) -> dict[str, Any]:
        lp = -0.1 * (1 + (start + i) % 5)
        alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode())}]
        alternatives += [{"token": w, "logprob": lp - 1 - k, "bytes": list(w.encode())} for k, w in enumerate(_WORDS)]
        return {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": alternatives[:top]}

    return {"content": [entry(i, t) for i, t in enumerate(tokens)]}


def _completion(body: dict[str, Any], tokens: list[str], finish: str) -> dict[str, Any]:
    call = _tool_call(body)
    message: dict[str, Any] = {"role": "assistant", "content": None if call else "".join(tokens)}
    if call is not None:
        message["tool_calls"] = [call]
    choices = [{"index": i, "message": message, "logprobs": _logprobs(body, tokens, 0), "finish_reason": finish}
               for i in range(_choices(body))]
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"), "choices": choices, "usage": _usage(body, tokens)}


# --- streaming -----------------------------------------------------------------------


async def _stream(send: Send, knobs: UpstreamKnobs, body: dict[str, Any], tokens: list[str], finish: str,
                  completed: Callable[[], None]) -> None:
    """Streams the answer as OpenAI does: a role chunk, one chunk per token, a finish chunk,
    a usage chunk when asked, then ``[DONE]``. The failure knobs cut it short."""
    include_usage = knobs.send_usage and bool((body.get("stream_options") or {}).get("include_usage"))
    usage_field = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], reason: str | None = None, logprobs: Any = None, index: int = 0) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
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
    call = _tool_call(body)
    for index in range(_choices(body)):  # the first choice's text went out above; the others (n > 1) follow
        if index:
            await _event(send, chunk({"role": "assistant", "content": ""}, index=index))
            for i, token in enumerate(tokens):
                await _event(send, chunk({"content": token}, logprobs=_logprobs(body, [token], i), index=index))
        if call is not None:  # in two pieces, as OpenAI streams one: id, type and name first, then arguments
            head = {"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
            await _event(send, chunk({"tool_calls": [head]}, index=index))
            await _event(send, chunk({"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]}, index=index))
    for index in range(_choices(body)):
        await _event(send, chunk({}, reason=finish, index=index))
    if include_usage:
        await _event(send, {**chunk({}), "choices": [], "usage": _usage(body, tokens)})
    completed()
    await _body(send, b"data: [DONE]\n\n", more=False)


def _text_logprobs(body: dict[str, Any], tokens: list[str], start: int) -> dict[str, Any] | None:
    """The completions API's logprobs (``logprobs: 0`` asks for the chosen tokens' only)."""
    if body.get("logprobs") is None:
        return None
    return {"tokens": tokens, "token_logprobs": [-0.1 * (1 + (start + i) % 5) for i in range(len(tokens))],
            "top_logprobs": None, "text_offset": []}


async def _stream_text(send: Send, knobs: UpstreamKnobs, body: dict[str, Any], tokens: list[str], finish: str,
                       completed: Callable[[], None]) -> None:
    """The legacy stream: one text_completion event per token, a finish event, usage when
    asked, ``[DONE]``; the failure knobs cut it short as in chat."""
    include_usage = knobs.send_usage and bool((body.get("stream_options") or {}).get("include_usage"))

    def event(text: str, reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body.get("model", "fake"),
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}]}

    await _start(send, 200, "text/event-stream")
    for i, token in enumerate(tokens):
        if knobs.fail_after_tokens is not None and i == knobs.fail_after_tokens:
            await _break(send, knobs)
            return
        if i and knobs.token_delay_s:
            await asyncio.sleep(knobs.token_delay_s)
        await _event(send, event(token, logprobs=_text_logprobs(body, [token], i)))
    await _event(send, event("", reason=finish))
    if include_usage:
        await _event(send, {**event(""), "choices": [], "usage": _usage(body, tokens)})
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
