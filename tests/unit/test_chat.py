from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.chat import ROUTE_CONTEXT_CHARS, ROUTE_CONTEXT_TURNS, last_user_text, route_query_of, to_generation_request
from cluster.config import GatewayConfig
from cluster.errors import ContextLengthExceededError, InvalidRequestError
from cluster.openai_schema import ChatCompletionRequest, chunk_body, completion_body
from cluster.types import ChatMessage, RouteQuery

GW = GatewayConfig(max_tokens_cap=100, default_max_tokens=10, max_prompt_chars=50, max_messages=3)


def req(**kw) -> ChatCompletionRequest:
    data = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(data)


def test_defaults_and_mapping() -> None:
    gen = to_generation_request(req(stop="END", seed=3, logprobs=True, temperature=0.5), GW, "r1")
    assert gen.request_id == "r1"
    s = gen.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed, s.logprobs) == (10, 0.5, 1.0, ("END",), 3, True)
    assert to_generation_request(req(), GW, "r").sampling.temperature == 1.0  # OpenAI's default


def test_content_parts_and_developer_role() -> None:
    r = req(messages=[{"role": "developer", "content": "be terse"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    gen = to_generation_request(r, GW, "r")
    assert [(m.role, m.content) for m in gen.messages] == [("system", "be terse"), ("user", "ab")]
    assert last_user_text(gen) == "ab"


@pytest.mark.parametrize(
    ("kw", "error", "param"),
    [
        ({"max_tokens": 101}, InvalidRequestError, "max_tokens"),
        ({"max_completion_tokens": 101}, InvalidRequestError, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 51}]}, ContextLengthExceededError, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 4}, InvalidRequestError, "messages"),
        ({"messages": [{"role": "system", "content": "only system"}]}, InvalidRequestError, "messages"),
    ],
)
def test_limits(kw: dict, error: type, param: str) -> None:
    with pytest.raises(error) as info:
        to_generation_request(req(**kw), GW, "r")
    assert info.value.param == param and info.value.http_status == 400


@pytest.mark.parametrize(
    "kw",
    [{"n": 17}, {"top_logprobs": 21}, {"stop": ["a", "b", "c", "d", "e"]}, {"messages": []}, {"bogus": 1}, {"temperature": -1},
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}],
)
def test_schema_rejects(kw: dict) -> None:
    with pytest.raises(ValidationError):
        req(**kw)


def test_bodies_follow_openai_shapes() -> None:
    body = completion_body(completion_id="c", created=1, model="code@v1", text="hi", finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, logprobs=[("hi", -0.1)])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1
    usage_only = chunk_body(completion_id="c", created=1, model="m", delta={}, usage={"total_tokens": 2}, with_choice=False)
    assert usage_only["choices"] == [] and usage_only["usage"] == {"total_tokens": 2}


def _msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


@pytest.mark.parametrize(("messages", "request_text", "context"), [
    (_msgs(("user", "fix my loop")), "fix my loop", ()),
    (_msgs(("system", "s"), ("user", "write a SQL query"), ("assistant", "SELECT 1"), ("user", "now sort it")),
     "now sort it", ("write a SQL query",)),
    # most recent first, at most ROUTE_CONTEXT_TURNS, blank turns skipped, each cut
    (_msgs(("user", "a"), ("user", "b"), ("user", "  "), ("user", "c" * 5000), ("user", "d")), "d", ("c" * ROUTE_CONTEXT_CHARS, "b")),
    (_msgs(("assistant", "hello")), "", ()),
])
def test_route_query_is_the_last_user_turn_with_earlier_ones_as_context(messages, request_text, context) -> None:
    assert ROUTE_CONTEXT_TURNS == 2
    assert route_query_of(messages) == RouteQuery(request_text, context)
