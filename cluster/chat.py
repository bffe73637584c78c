"""Pure checks that turn a validated wire request into an internal GenerationRequest."""

from __future__ import annotations

from typing import Sequence

from cluster.config import GatewayConfig
from cluster.errors import ContextLengthExceededError, InvalidRequestError
from cluster.openai_schema import ChatCompletionRequest
from cluster.types import ChatMessage, GenerationRequest, RouteQuery, SamplingParams, ToolCall


def to_generation_request(req: ChatCompletionRequest, gw: GatewayConfig, request_id: str) -> GenerationRequest:
    """Apply the gateway's limits; raise a 4xx typed error naming the offending param."""
    if len(req.messages) > gw.max_messages:
        raise InvalidRequestError(f"At most {gw.max_messages} messages are allowed, got {len(req.messages)}.", param="messages")
    max_tokens = req.requested_max_tokens()
    if max_tokens is None:
        max_tokens = gw.default_max_tokens
    elif max_tokens > gw.max_tokens_cap:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise InvalidRequestError(f"{param} is {max_tokens}; this server allows at most {gw.max_tokens_cap}.", param=param)

    combination = req.combination_error()
    if combination is not None:
        raise InvalidRequestError(combination[0], param=combination[1])

    messages = []
    total_chars = 0
    for msg in req.messages:
        text = msg.text()
        total_chars += len(text)
        role = "system" if msg.role == "developer" else msg.role
        calls = tuple(
            ToolCall(index=i, id=c.id, name=c.function.name, arguments=c.function.arguments) for i, c in enumerate(msg.tool_calls or ())
        )
        total_chars += sum(len(c.arguments) for c in calls)
        messages.append(ChatMessage(role=role, content=text, tool_calls=calls, tool_call_id=msg.tool_call_id))
    if total_chars > gw.max_prompt_chars:
        raise ContextLengthExceededError(
            f"The prompt is {total_chars} characters; this server allows at most {gw.max_prompt_chars}.", param="messages"
        )
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise InvalidRequestError("messages must contain a non-empty user message.", param="messages")

    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else 1.0,  # OpenAI default
        top_p=req.top_p if req.top_p is not None else 1.0,
        stop=req.stop_sequences(),
        seed=req.seed,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
        n=req.n or 1,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=tuple((int(token), float(bias)) for token, bias in (req.logit_bias or {}).items()),
        tools=tuple(t.model_dump(exclude_none=True) for t in req.tools or ()),
        tool_choice=req.tool_choice if isinstance(req.tool_choice, str | None) else req.tool_choice.model_dump(),
        response_format=req.response_format.model_dump(exclude_none=True, by_alias=True) if req.response_format else None,
    )
    # A version's sampling defaults (ModelVersionConfig.defaults) fill what the client left out.
    unset = frozenset(name for name in ("temperature", "top_p") if getattr(req, name) is None)
    return GenerationRequest(request_id=request_id, messages=tuple(messages), sampling=sampling, unset_sampling=unset)


def last_user_text(request: GenerationRequest) -> str:
    for msg in reversed(request.messages):
        if msg.role == "user":
            return msg.content
    return ""


# Earlier user turns the router sees, and how much of each: enough to carry a follow-up's
# topic ("now make it async"); the router's window (256 tokens) is the real bound.
ROUTE_CONTEXT_TURNS = 2
ROUTE_CONTEXT_CHARS = 2000


def route_query(request: GenerationRequest) -> RouteQuery:
    return route_query_of(request.messages)


def route_query_of(messages: Sequence[ChatMessage]) -> RouteQuery:
    """The last user turn with up to ``ROUTE_CONTEXT_TURNS`` earlier user turns as context
    (most recent first, each cut to ``ROUTE_CONTEXT_CHARS``)."""
    users = [m.content for m in messages if m.role == "user" and m.content.strip()]
    if not users:
        return RouteQuery("")
    context = tuple(text[:ROUTE_CONTEXT_CHARS] for text in reversed(users[:-1]))[:ROUTE_CONTEXT_TURNS]
    return RouteQuery(users[-1], context)
