"""The OpenAI wire format as the ``remote_openai`` engine speaks it; pure, no I/O.

- request bodies: ``chat_payload`` (``/chat/completions``) and ``completions_payload`` (the
  legacy ``/completions``, for raw prompts), with ``optional_params`` passed through;
- the stream: ``SSEDecoder`` (server-sent events, line by line) and ``StreamAnswer`` (events
  to ``GenerationChunk``s, finish reason and usage);
- ``status_error``: the typed error for an upstream HTTP error status (the table is in
  ``deployments/engines/remote_openai.py``'s docstring).

Upstream garbage is raised as ``EngineError`` (502), never as one of our own 500s.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Mapping

from cluster.errors import EngineError, EngineTimeoutError, EngineUnavailableError, SLMError
from cluster.types import ChatMessage, FinishReason, GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob, ToolCall, Usage
from deployments.engines.common import messages_as_dicts, penalty_kwargs

# Anything else (tool_calls, content_filter) ends the answer as "stop".
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_MESSAGE_LIMIT = 300  # upstream error text kept in our messages


# --- request bodies ----------------------------------------------------------------------


def _base(model: str, sampling: SamplingParams) -> dict[str, Any]:
    """What both bodies carry: streamed with usage in the last event, the sampling every
    engine takes, and stop and seed only when set (some compatible servers reject nulls
    they do not know)."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    return body


def chat_payload(model: str, request: GenerationRequest, messages: tuple[ChatMessage, ...]) -> dict[str, Any]:
    """The upstream ``/chat/completions`` body, with the optional OpenAI fields the request uses."""
    sampling = request.sampling
    body = {**_base(model, sampling), "messages": messages_as_dicts(messages)}
    if sampling.logprobs:
        body["logprobs"] = True
    body.update(optional_params(sampling))
    return body


def completions_payload(model: str, request: GenerationRequest) -> dict[str, Any]:
    """The upstream ``/completions`` body for a raw prompt (``logprobs: 0``: the chosen
    tokens' logprobs, the legacy API's way of asking for them)."""
    body = {**_base(model, request.sampling), "prompt": request.prompt}
    if request.sampling.logprobs:
        body["logprobs"] = 0
    return body


def unary(body: dict[str, Any]) -> dict[str, Any]:
    """The same body, asking for the whole answer as one JSON object (no stream, no events)."""
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["stream"] = False
    return out


def optional_params(sampling: SamplingParams) -> dict[str, Any]:
    """The optional OpenAI parameters a request uses, as the upstream takes them: passed
    through unchanged (cluster/capabilities.py lists them all for this engine)."""
    body: dict[str, Any] = {}
    if sampling.n > 1:
        body["n"] = sampling.n
    if sampling.top_logprobs:
        body["top_logprobs"] = sampling.top_logprobs
    body.update(penalty_kwargs(sampling, bias_keys_as_str=True))  # JSON object keys are strings
    if sampling.tools:
        body["tools"] = list(sampling.tools)
    if sampling.tool_choice is not None:
        body["tool_choice"] = sampling.tool_choice
    if sampling.response_format is not None:
        body["response_format"] = sampling.response_format
    return body


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


class StreamAnswer:
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

    def feed_completion(self, body: bytes) -> list[GenerationChunk]:
        """The chunks of a whole (unstreamed) answer: each choice's ``message`` is read as
        one delta, so both shapes fold the same way (legacy completions keep ``text``)."""
        data = body.decode(errors="replace")
        completion = _json_object(data)
        if completion.get("error") or completion.get("object") == "error":
            raise EngineError(f"upstream error: {_error_text(completion)}", code="upstream_stream_error")
        try:
            choices = []
            for choice in completion.get("choices") or ():
                message = choice.get("message") or {}
                delta: dict[str, Any] = {"content": message.get("content")}
                if message.get("tool_calls"):
                    delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
                choices.append({**choice, "delta": delta})
            chunks = self._read_event({"choices": choices, "usage": completion.get("usage")})
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise EngineError(f"upstream sent an unreadable answer: {data[:_MESSAGE_LIMIT]!r}", code="upstream_bad_stream") from err
        self.done = True
        return chunks

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


# --- upstream errors ---------------------------------------------------------------------


def status_error(status: int, body: bytes) -> SLMError:
    """The typed error for an upstream HTTP error status (the table in ``remote_openai``'s module docstring)."""
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
