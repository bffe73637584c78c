"""The OpenAI chat-completions wire schema: request validation and response bodies.

Requests are validated strictly at the edge (unknown arguments rejected the way OpenAI
does); responses are plain dicts built by small functions so the hot path skips pydantic.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.errors import InvalidRequestError


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class WireFunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class WireToolCall(BaseModel):
    """A call an earlier assistant turn made (sent back so the model sees its own call)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: WireFunctionCall


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null on an assistant turn that only called tools
    name: str | None = None
    tool_calls: list[WireToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _turn_shape(self) -> "WireMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required unless an assistant message has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


MAX_N = 16  # choices per request: each costs a full generation


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
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int | None = Field(None, ge=1, le=MAX_N)
    user: str | None = None
    # Honoured by the engines that declare them (cluster/capabilities.py); refused with a
    # 400 naming the parameter by the others, never dropped.
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise ValueError("keys must be token ids and values between -100 and 100")
        return value

    def combination_error(self) -> tuple[str, str] | None:
        """(message, param) when fields that are valid alone do not go together."""
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs requires logprobs to be true.", "top_logprobs"
        if self.tool_choice is not None and not self.tools:
            return "tool_choice is only allowed when tools are specified.", "tool_choice"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                return f"tool_choice names {self.tool_choice.function.name!r}, which is not among tools.", "tool_choice"
        return None

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


def logprobs_body(items: list[tuple[str, float]] | list[tuple[str, float, tuple[tuple[str, float], ...]]]) -> dict[str, Any]:
    """Each item is (token, logprob) or (token, logprob, top alternatives)."""
    return {"content": [_logprob_item(item) for item in items]}


def _logprob_item(item: tuple[Any, ...]) -> dict[str, Any]:
    token, lp = item[0], item[1]
    top = item[2] if len(item) > 2 else ()
    return {
        "token": token,
        "logprob": lp,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top],
    }


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
    choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One chat.completion; ``choices`` (from ``choice_body``) replaces the single choice
    that ``text``, ``finish_reason`` and ``logprobs`` describe."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices if choices is not None else [choice_body(0, text, finish_reason, logprobs)],
        "usage": usage,
    }


def choice_body(
    index: int,
    text: str,
    finish_reason: str,
    logprobs: list[Any] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a chat.completion; with tool calls, content is null unless there was text."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "finish_reason": finish_reason,
        "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
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
    index: int = 0,
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
                "index": index,
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
