"""OpenAI's optional chat features through the official ``openai`` client, into a real
gateway on Serve: fake engines, and a ``remote_openai`` frontier over a recording fake
upstream (what reached the upstream is asserted, parameter by parameter)."""

from __future__ import annotations

import json

import openai
import pytest

from cluster.loader import config_from_dict
from tests.fakes.openai_upstream import OpenAIUpstream
from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

TOKENS = 6
TOOL = {"type": "function", "function": {"name": "weather", "description": "The weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _fake(name: str) -> dict:
    return {"name": name, "role": "specialist" if name == "code" else "general", "versions": [
        {"name": "v1", "engine": {"kind": "fake", "default_completion_tokens": TOKENS}, "resources": {"num_cpus": 0.05}}]}


@pytest.fixture(scope="module")
def upstream():
    with OpenAIUpstream(answer_tokens=TOKENS) as up:
        yield up


@pytest.fixture(scope="module")
def client(ray_local: dict, upstream: OpenAIUpstream) -> openai.OpenAI:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    frontier = {"name": "frontier", "role": "frontier", "versions": [{
        "name": "v1", "engine": {"kind": "remote_openai", "base_url": upstream.base_url, "model": "up"},
        "location": "on_prem",  # the data policy is not under test here
        "resources": {"num_cpus": 0.05}}]}
    cfg = {
        "name": "oai",
        "models": [{**_fake("code"), "domains": ["code"]}, _fake("general"), frontier],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "strategy": {"escalate": False},
        "gateway": {"resources": {"num_cpus": 0.05}},
    }
    serve.run(build_from_config(config_from_dict(cfg)), name="oai", route_prefix="/")
    return openai.OpenAI(base_url=f"{ray_local['base_url']}/v1", api_key="unused", max_retries=0, timeout=30)


def test_remote_openai_passes_every_parameter_through(client: openai.OpenAI, upstream: OpenAIUpstream) -> None:
    out = client.chat.completions.create(
        model="frontier", messages=USER, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "weather"}},
        response_format=SCHEMA, n=2, logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=-0.5,
        logit_bias={"42": -100}, stop=["\n\n"], seed=7,
    )
    sent = upstream.last_body
    assert sent["tools"] == [TOOL] and sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert sent["response_format"] == SCHEMA and sent["n"] == 2 and sent["top_logprobs"] == 3 and sent["logprobs"] is True
    assert (sent["presence_penalty"], sent["frequency_penalty"], sent["logit_bias"], sent["stop"]) == (0.5, -0.5, {"42": -100.0}, ["\n\n"])
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        (call,) = choice.message.tool_calls
        assert (call.id, call.type, call.function.name, json.loads(call.function.arguments)) == (
            "call_upstream_1", "function", "weather", {"city": "Paris"})
        assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_remote_openai_streams_tool_call_deltas(client: openai.OpenAI, upstream: OpenAIUpstream) -> None:
    stream = client.chat.completions.create(model="frontier", messages=USER, tools=[TOOL], tool_choice="required", stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.extend(choice.delta.tool_calls or ())
            finish = choice.finish_reason or finish
    head, *rest = pieces
    assert (head.index, head.id, head.type, head.function.name) == (0, "call_upstream_1", "function", "weather")
    assert all(p.id is None and p.function.name is None for p in rest)
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert upstream.last_body["tool_choice"] == "required"


def test_n_choices_stream_with_indexes_and_usage_counts_them_all(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(model="general", messages=USER, n=3, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2] and all(texts.values()) and len(set(texts.values())) == 3
    assert sorted(finishes) == [0, 1, 2]
    assert usage is not None and usage.completion_tokens == 3 * TOKENS


def test_fake_engine_tools_json_and_top_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="general", messages=USER, tools=[TOOL], tool_choice="required")
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert out.choices[0].finish_reason == "tool_calls"
    # the tool's answer goes back with the assistant's call, as clients send it
    follow = client.chat.completions.create(model="general", tools=[TOOL], messages=[
        *USER, out.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content and follow.choices[0].finish_reason in ("stop", "length")
    data = client.chat.completions.create(model="general", messages=USER, response_format={"type": "json_object"}, max_tokens=50)
    assert isinstance(json.loads(data.choices[0].message.content), dict)
    lp = client.chat.completions.create(model="general", messages=USER, logprobs=True, top_logprobs=3)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in lp.choices[0].logprobs.content)


def test_a_parameter_the_engine_cannot_honour_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="general", messages=USER, presence_penalty=0.5)
    err = info.value.body
    assert (err["param"], err["code"], err["type"]) == ("presence_penalty", "unsupported_parameter", "invalid_request_error")


def test_auto_sends_what_the_routed_model_cannot_honour_to_one_that_can(client: openai.OpenAI, upstream: OpenAIUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=USER, frequency_penalty=0.25)
    assert raw.headers["x-slm-route-reason"] == "frontier:capability" and raw.headers["x-slm-model"] == "frontier"
    assert upstream.last_body["frequency_penalty"] == 0.25
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=USER, tools=[TOOL])
    assert raw.headers["x-slm-model"] != "frontier"  # the fakes honour tools: no need to leave them
