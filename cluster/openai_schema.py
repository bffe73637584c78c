"""The OpenAI chat-completions wire schema: request validation and response bodies.

Requests are validated strictly at the edge (unknown arguments rejected the way OpenAI
does); responses are plain dicts built by small functions so the hot path skips pydantic.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.errors import InvalidRequestError


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request that this gateway honours; others are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[WireMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as the engines take it
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=0)
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = None
    # Accepted for client compatibility; they have no effect on these engines.
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """The request body, validated; any other input raises ``InvalidRequestError`` (a 400:
    ``invalid_json`` when it is not a JSON object, ``invalid_request`` naming the field
    otherwise). Nothing else escapes, whatever the bytes: nesting too deep for the JSON
    parser (``"[" * 200000``) is ``invalid_json`` too, not a RecursionError."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except (ValidationError, RecursionError) as err:
        message, param = validation_message(err) if isinstance(err, ValidationError) else ("The request is nested too deeply.", None)
        raise InvalidRequestError(message, param=param) from None


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """OpenAI's wording for the first problem, and the field it names (``messages[0].role``)."""
    first = err.errors(include_url=False)[0]
    param = _loc(tuple(first["loc"])) or None
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return f"Invalid value for {param}: {first['msg']}", param


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def logprobs_body(items: list[tuple[str, float]]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in items]}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int],
    logprobs: list[tuple[str, float]] | None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
            }
        ],
        "usage": usage,
    }


def chunk_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: list[tuple[str, float]] | None = None,
    usage: dict[str, int] | None = None,
    with_choice: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
    }
    if with_choice:
        body["choices"] = [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
            }
        ]
    if usage is not None:
        body["usage"] = usage
    return body


def models_body(ids: list[str], created: int, owner: str = "slm-cluster") -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": owner} for i in ids]}
