"""OpenAI's optional chat features: schema, the capability table and checks, routing and
tier filtering by capability, the engines' mappings, and the wire shapes of tool calls
and of several choices (issue 13)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
from pydantic import ValidationError

from cluster import capabilities, strategy
from cluster.chat import to_generation_request
from cluster.config import FakeEngineConfig, GatewayConfig, VLLMEngineConfig
from cluster.errors import InvalidRequestError
from cluster.loader import config_from_dict
from cluster.openai_schema import ChatCompletionRequest
from cluster.policy import Screened
from cluster.routing import apply_split, route_capable
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, RouteDecision, SamplingParams, TokenLogprob, ToolCall, Usage
from deployments.engines import sglang, vllm
from deployments.engines.fake import FakeEngine
from deployments.engines.hf import HFEngine
from deployments.engines.remote_openai import RemoteOpenAIEngine, _Answer
from deployments.gateway.responses import collect_completion, sse_events
from tests.fakes.vllm_engine import FakeSamplingParams

TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}}


def wire(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "auto", "messages": [{"role": "user", "content": "hi"}], **kw})


def gen(**kw: Any) -> GenerationRequest:
    return to_generation_request(wire(**kw), GatewayConfig(), "r1")


# --- schema and the internal request ---------------------------------------------------


def test_every_feature_reaches_the_sampling_params() -> None:
    g = gen(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "weather"}}, response_format=SCHEMA, n=3,
            logprobs=True, top_logprobs=20, presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"42": -100}, stop="x")
    s = g.sampling
    assert s.tools == (TOOL,) and s.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert s.response_format == SCHEMA and s.n == 3 and s.top_logprobs == 20
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias, s.stop) == (0.5, -0.5, ((42, -100.0),), ("x",))
    assert capabilities.requested(s) == capabilities.FEATURES


def test_tool_turns_become_chat_messages() -> None:
    g = gen(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    assert g.messages[1] == ChatMessage("assistant", "", tool_calls=(ToolCall(0, "c1", "weather", "{}"),))
    assert g.messages[2] == ChatMessage("tool", "sunny", tool_call_id="c1")


@pytest.mark.parametrize("kw", [
    {"top_logprobs": 21, "logprobs": True}, {"n": 17}, {"logit_bias": {"abc": 1}}, {"logit_bias": {"1": 101}},
    {"response_format": {"type": "json_schema"}}, {"response_format": {"type": "xml"}}, {"tools": [{"type": "function"}]},
    {"messages": [{"role": "tool", "content": "x"}]}, {"messages": [{"role": "user", "content": None}]},
])
def test_schema_refuses(kw: dict) -> None:
    with pytest.raises(ValidationError):
        wire(**kw)


@pytest.mark.parametrize(("kw", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
])
def test_combinations_are_400s_naming_the_param(kw: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        gen(**kw)
    assert info.value.param == param


@pytest.mark.parametrize(("sampling", "used"), [
    (SamplingParams(), ()),
    (SamplingParams(response_format={"type": "text"}, n=1, top_logprobs=0), ()),
    (SamplingParams(n=2, stop=("a",)), ("stop", "n")),
    (SamplingParams(tools=(TOOL,), tool_choice="auto"), ("tools", "tool_choice")),
    (SamplingParams(presence_penalty=0.1, logit_bias=((1, 2.0),)), ("presence_penalty", "logit_bias")),
])
def test_requested(sampling: SamplingParams, used: tuple[str, ...]) -> None:
    assert capabilities.requested(sampling) == used


def test_the_table_is_what_the_adapters_declare() -> None:
    adapters = {"fake": FakeEngine, "remote_openai": RemoteOpenAIEngine, "vllm": vllm.VLLMEngine, "sglang": sglang.SGLangEngine, "hf": HFEngine}
    assert set(adapters) == set(capabilities.ENGINE_PARAMS)
    for kind, cls in adapters.items():
        assert cls.capabilities.params == capabilities.ENGINE_PARAMS[kind], kind
    assert capabilities.ENGINE_PARAMS["remote_openai"] == frozenset(capabilities.FEATURES)


# --- routing and tiers by capability ----------------------------------------------------


def _cfg(*, specialist: str = "vllm", general: str = "hf", frontier: str | None = "remote_openai") -> Any:
    engines = {
        "vllm": {"kind": "vllm", "model": "m"},
        "vllm_tools": {"kind": "vllm", "model": "m", "tool_parser": "hermes"},
        "hf": {"kind": "hf", "model_path": "/nonexistent"},
        "fake": {"kind": "fake"},
        "remote_openai": {"kind": "remote_openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"},
    }
    models = [
        {"name": "code", "role": "specialist", "domains": ["code"],
         "versions": [{"name": "v1", "engine": engines[specialist], "resources": {"num_gpus": 1} if specialist.startswith("vllm") else {}}]},
        {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": engines[general]}]},
    ]
    if frontier is not None:
        models.append({"name": "frontier", "role": "frontier", "versions": [{"name": "v1", "engine": engines[frontier]}]})
    return config_from_dict({"name": "caps", "models": models, "strategy": {"cascade_tiers": ["routed", "general", "frontier"]}})


ROUTED = RouteDecision(model="code", version="v1", reason="domain:code", domain="code")


@pytest.mark.parametrize(("cfg", "needed", "auto", "reason"), [
    (_cfg(), (), True, "domain:code"),
    (_cfg(), ("presence_penalty",), True, "domain:code"),  # vLLM honours penalties
    (_cfg(), ("tools",), True, "frontier:capability"),
    (_cfg(general="fake"), ("tools", "tool_choice"), True, "general:capability"),
    (_cfg(general="fake"), ("presence_penalty",), True, "domain:code"),
    (_cfg(general="fake"), ("n",), True, "domain:code"),  # vLLM honours n
    (_cfg(specialist="hf", general="fake"), ("n",), True, "general:capability"),
    (_cfg(specialist="vllm_tools"), ("tools", "tool_choice"), True, "domain:code"),  # vLLM with a tool_parser
])
def test_route_capable(cfg: Any, needed: tuple[str, ...], auto: bool, reason: str) -> None:
    decision = route_capable(cfg, ROUTED, needed, auto=auto)
    assert decision.reason == reason
    assert capabilities.capable(cfg, decision, needed)
    assert decision.domain == "code"  # the router's view rides along


def test_a_capability_fallback_takes_the_fallback_models_traffic_split() -> None:
    data = _cfg(general="fake").model_dump(mode="json")
    general = next(m for m in data["models"] if m["name"] == "general")
    general["versions"].append({**general["versions"][0], "name": "v2"})  # a fake too: it honours tools
    general["versions"].append({**general["versions"][0], "name": "v3", "engine": {"kind": "hf", "model_path": "/x"}})
    cfg = config_from_dict(data)

    def split_to(version: str):  # type: ignore[no-untyped-def]
        return lambda d: apply_split(cfg, d, {"general": {"v1": 0, version: 100}}, {}, "user-1")

    picked = route_capable(cfg, ROUTED, ("tools",), auto=True, split=split_to("v2"))
    assert (picked.model, picked.version, picked.reason) == ("general", "v2", "general:capability")
    # the split's pick cannot honour tools (hf): the current version serves instead
    picked = route_capable(cfg, ROUTED, ("tools",), auto=True, split=split_to("v3"))
    assert (picked.model, picked.version) == ("general", "v1")


@pytest.mark.parametrize(("cfg", "needed", "auto", "param"), [
    (_cfg(), ("tools",), False, "tools"),  # a named model is never swapped
    (_cfg(frontier=None), ("tools",), True, "tools"),  # nobody can
    (_cfg(specialist="hf", frontier=None), ("stop", "n"), True, "n"),
])
def test_route_capable_refuses(cfg: Any, needed: tuple[str, ...], auto: bool, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        route_capable(cfg, ROUTED, needed, auto=auto)
    err = info.value.to_openai()["error"]
    assert (err["param"], err["code"], err["type"], info.value.http_status) == (param, "unsupported_parameter", "invalid_request_error", 400)


def _plan(cfg: Any, chosen: str, first: RouteDecision, needed: tuple[str, ...]) -> strategy.Plan:
    return strategy.plan(cfg, chosen, first, auto=True, screened=Screened(data_class="public", external_messages=()),
                         budget_ms=None, expected_ms={}, needed=needed)


def test_cascade_and_race_skip_tiers_that_cannot() -> None:
    cfg = _cfg(specialist="fake", general="hf")
    first = RouteDecision(model="code", version="v1", reason="domain:code")
    tiers = [t.model for t in _plan(cfg, "cascade", first, ()).tiers]
    assert tiers == ["code", "general", "frontier"]
    assert [t.model for t in _plan(cfg, "cascade", first, ("n",)).tiers] == ["code", "frontier"]  # hf cannot n > 1
    cfg = _cfg(specialist="fake", general="fake", frontier="hf")
    plan = _plan(cfg, "race", first, ("tools",))
    assert [t.model for t in plan.tiers] == ["code"] and plan.frontier_skipped == "capability"
    assert [t.model for t in _plan(cfg, "race", first, ()).tiers] == ["code", "frontier"]


# --- engine mappings -------------------------------------------------------------------


def test_vllm_sampling_kwargs_pass_every_supported_parameter() -> None:
    s = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=((7, -100.0),), stop=("x",), response_format=SCHEMA)
    kw = vllm.sampling_kwargs(s)
    assert kw["presence_penalty"] == 0.5 and kw["frequency_penalty"] == 1.0 and kw["logit_bias"] == {7: -100.0}
    assert kw["structured_outputs"] == {"json": SCHEMA["json_schema"]["schema"]}
    assert vllm.sampling_kwargs(SamplingParams(response_format={"type": "json_object"}))["structured_outputs"] == {"json_object": True}
    assert "presence_penalty" not in vllm.sampling_kwargs(SamplingParams())
    FakeSamplingParams(**kw)  # the fake validates like vLLM's SamplingParams


def test_sglang_sampling_params_pass_every_supported_parameter() -> None:
    params = sglang.sampling_params(SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=((7, -1.0),),
                                                   response_format=SCHEMA))
    assert params["presence_penalty"] == 0.5 and params["frequency_penalty"] == 1.0 and params["logit_bias"] == {"7": -1.0}
    assert json.loads(params["json_schema"]) == SCHEMA["json_schema"]["schema"]
    assert json.loads(sglang.sampling_params(SamplingParams(response_format={"type": "json_object"}))["json_schema"]) == {"type": "object"}


def test_adapters_refuse_what_they_do_not_declare() -> None:
    request = GenerationRequest("r", (ChatMessage("user", "hi"),), SamplingParams(tools=(TOOL,)))
    with pytest.raises(InvalidRequestError) as info:
        capabilities.refuse_unsupported(vllm.VLLMEngine(VLLMEngineConfig(kind="vllm", model="m")).capabilities, request, "vllm")
    assert (info.value.param, info.value.code) == ("tools", "unsupported_parameter")


async def _fake(sampling: SamplingParams) -> list[GenerationChunk]:
    engine = FakeEngine(FakeEngineConfig(kind="fake", default_completion_tokens=8))
    await engine.start()
    return [c async for c in engine.generate(GenerationRequest("r", (ChatMessage("user", "hi"),), sampling))]


async def test_fake_engine_honours_n_tools_json_and_top_logprobs() -> None:
    chunks = await _fake(SamplingParams(n=3, logprobs=True, top_logprobs=2))
    assert {c.index for c in chunks[:-1]} == {0, 1, 2}
    assert chunks[-1].finish_reasons == ("stop",) * 3 and chunks[-1].usage.completion_tokens == 24
    assert all(len(lp.top) == 2 and lp.top[0] == (lp.token, lp.logprob) for c in chunks for lp in c.logprobs)
    chunks = await _fake(SamplingParams(tools=(TOOL,), tool_choice="required"))
    (call,) = chunks[0].tool_calls
    assert call.name == "weather" and json.loads(call.arguments).keys() == {"city"} and chunks[-1].finish_reason == "tool_calls"
    assert not any(c.tool_calls for c in await _fake(SamplingParams(tools=(TOOL,), tool_choice="auto")))
    assert json.loads("".join(c.text for c in await _fake(SamplingParams(max_tokens=50, response_format=SCHEMA)))) == {"n": 1}
    assert isinstance(json.loads("".join(c.text for c in await _fake(SamplingParams(max_tokens=50, response_format={"type": "json_object"})))), dict)
    with pytest.raises(InvalidRequestError) as info:
        await _fake(SamplingParams(presence_penalty=1.0))
    assert info.value.param == "presence_penalty"


def test_remote_answer_reads_tool_call_deltas_and_choices() -> None:
    answer = _Answer(want_logprobs=False)
    events = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]},
        {"choices": [{"index": 1, "delta": {"content": "hi"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}, {"index": 1, "delta": {}, "finish_reason": "length"}]},
    ]
    chunks = [c for e in events for c in answer.feed(json.dumps(e))]
    assert chunks[0].tool_calls == (ToolCall(0, "c1", "weather", ""),) and chunks[1].tool_calls == (ToolCall(0, None, None, "{}"),)
    assert (chunks[2].index, chunks[2].text) == (1, "hi")
    final = answer.final(prompt_chars=4)
    assert final.finish_reason == "tool_calls" and final.finish_reasons == ("tool_calls", "length")


# --- wire shapes -------------------------------------------------------------------------

META = {"id": "chatcmpl-x", "created": 1, "model": "general@v1"}
STREAM = [
    GenerationChunk(tool_calls=(ToolCall(0, "call_1", "weather", '{"ci'),)),
    GenerationChunk(tool_calls=(ToolCall(0, None, None, 'ty": "Paris"}'),)),
    GenerationChunk(text="B", index=1, logprobs=(TokenLogprob("B", -0.5, (("B", -0.5), ("C", -2.0))),)),
    GenerationChunk(finish_reason="tool_calls", usage=Usage(3, 5), finish_reasons=("tool_calls", "stop")),
]


async def _chunks() -> AsyncIterator[GenerationChunk]:
    for chunk in STREAM:
        yield chunk


async def test_stream_events_are_openai_tool_call_deltas_with_choice_indexes() -> None:
    chunks = _chunks()
    first = await chunks.__anext__()
    raw = [e async for e in sse_events(first, chunks, META, include_usage=True, logprobs=True)]
    assert raw[-1] == "data: [DONE]\n\n"
    events = [json.loads(e[len("data: "):]) for e in raw[:-1]]
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events if e["choices"]]
    assert deltas == [
        (0, {"role": "assistant", "content": ""}, None),
        (0, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"ci'}}]}, None),
        (0, {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}, None),
        (1, {"role": "assistant", "content": "B"}, None),
        (0, {}, "tool_calls"),
        (1, {}, "stop"),
    ]
    top = events[3]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [(t["token"], t["logprob"]) for t in top] == [("B", -0.5), ("C", -2.0)]
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_collected_completion_merges_tool_calls_and_keeps_every_choice() -> None:
    body = await collect_completion(_chunks(), META, logprobs=False)
    first, second = body["choices"]
    assert first["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}
    assert first["finish_reason"] == "tool_calls"
    assert (second["index"], second["message"], second["finish_reason"]) == (1, {"role": "assistant", "content": "B"}, "stop")
    assert body["usage"]["completion_tokens"] == 5


def test_the_gpu_profile_serves_tools_on_its_qwen_models_under_either_gpu_engine() -> None:
    from cluster.loader import load_profile

    cfg = load_profile("gpu")
    code = RouteDecision(model="code", version="v1", reason="domain:code", domain="code")
    math = RouteDecision(model="math", version="v1", reason="domain:math", domain="math")
    assert route_capable(cfg, code, ("tools", "tool_choice"), auto=True).model == "code"
    moved = route_capable(cfg, math, ("tools", "tool_choice"), auto=True)  # Qwen2.5-Math has no tool template
    assert (moved.model, moved.domain) == ("general", "math")
    # `engine.kind: sglang` alone switches the engine and keeps the parser (both libraries call it hermes)
    data = cfg.model_dump(mode="json")
    for model in data["models"]:
        if model["name"] in ("code", "general"):
            engine = model["versions"][0]["engine"]
            model["versions"][0]["engine"] = {"kind": "sglang", "model": engine["model"], "tool_parser": engine["tool_parser"],
                                              "gpu_memory_utilization": engine["gpu_memory_utilization"]}
    switched = config_from_dict(data)
    assert route_capable(switched, code, ("tools",), auto=True).model == "code"
    assert route_capable(switched, math, ("tools",), auto=True).model == "general"
