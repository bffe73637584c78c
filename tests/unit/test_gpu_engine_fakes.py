"""The vLLM and SGLang adapters against the library-shaped fakes in ``tests/fakes/``: what the
issue's review found (engine-side aborts, seeds, health, signal handlers, tokenising off the
event loop, config names), raw prompts (/v1/completions), top_logprobs, and how the fakes
themselves behave like the libraries."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import SGLangEngineConfig, VLLMEngineConfig
from cluster.errors import ContextLengthExceededError, EngineError, EngineUnavailableError, InvalidRequestError
from cluster.loader import resolve_config
from cluster.types import ChatMessage, GenerationRequest, SamplingParams, Usage
from deployments.engines.gpu_common import SEED_MAX, SEED_MIN, signal_handlers_guarded
from deployments.engines.sglang import SGLangEngine, engine_kwargs
from deployments.engines.vllm import VLLMEngine, engine_args_kwargs, token_logprobs
from deployments.gateway.tools import ChoiceParts
from tests.fakes.chat_tokenizer import answer_ids
from tests.fakes.sglang_engine import SERVER_ARGS, FakeSGLangEngine, fake_function_call_parser
from tests.fakes.vllm_engine import FakeAsyncLLM, Logprob, fake_vllm_backend

PROFILES = Path(__file__).resolve().parents[2] / "cluster" / "profiles"


def request(max_tokens: int = 8, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", messages=(ChatMessage("user", "Name three primes."),), sampling=SamplingParams(max_tokens=max_tokens, **sampling)
    )


async def vllm_engine(system_prompt: str | None = None, **knobs: Any) -> tuple[VLLMEngine, FakeAsyncLLM]:
    made: list[Any] = []

    def factory(config: VLLMEngineConfig) -> Any:
        made.append(threading.current_thread())
        return fake_vllm_backend(config, **knobs)

    engine = VLLMEngine(VLLMEngineConfig(kind="vllm", model="fake/tiny"), system_prompt=system_prompt, engine_factory=factory)
    await engine.start()
    assert made[0] is not threading.current_thread()  # the blocking constructor ran off the loop
    return engine, engine._backend.llm  # type: ignore[union-attr,return-value]


async def sglang_engine(system_prompt: str | None = None, **knobs: Any) -> tuple[SGLangEngine, FakeSGLangEngine]:
    made: list[FakeSGLangEngine] = []

    def factory(**kwargs: Any) -> FakeSGLangEngine:
        made.append(FakeSGLangEngine(**knobs, **kwargs))
        return made[0]

    config = SGLangEngineConfig(kind="sglang", model_path="fake/tiny", health_check_timeout_s=0.2)
    engine = SGLangEngine(config, system_prompt=system_prompt, engine_factory=factory)
    await engine.start()
    return engine, made[0]


# --- vLLM --------------------------------------------------------------------------------


async def test_vllm_engine_side_abort_is_a_503_not_a_cut_answer() -> None:
    engine, llm = await vllm_engine(token_delay_s=0.005)
    stream = engine.generate(request(max_tokens=32))
    first = await anext(stream)
    assert first.text
    llm.engine_abort(llm.calls[0][2])
    with pytest.raises(EngineUnavailableError) as info:
        async for _ in stream:
            pass
    assert info.value.http_status == 503 and info.value.retryable


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2**64])
async def test_vllm_seed_outside_int64_is_a_400_before_the_engine_runs(seed: int) -> None:
    engine, llm = await vllm_engine()
    with pytest.raises(InvalidRequestError) as info:
        [c async for c in engine.generate(request(seed=seed))]
    assert info.value.http_status == 400 and info.value.param == "seed"
    assert llm.calls == []


async def test_vllm_seed_at_the_int64_bounds_is_accepted() -> None:
    engine, llm = await vllm_engine()
    for seed in (SEED_MAX, SEED_MIN):
        chunks = [c async for c in engine.generate(request(temperature=0.5, seed=seed))]
        assert chunks[-1].finish_reason in ("stop", "length")


async def test_vllm_tokenises_on_its_own_thread_and_never_concurrently() -> None:
    engine, llm = await vllm_engine()
    llm.tokenizer._encode_delay_s = 0.01  # long enough for overlapping calls to collide
    answers = await asyncio.gather(*(_text(engine, request()) for _ in range(8)))  # "Already borrowed" if two threads overlapped
    assert len(set(answers)) == 1
    assert llm.tokenizer.calls_on_threads and all(name.startswith("vllm-tokenizer") for name in llm.tokenizer.calls_on_threads)


async def test_vllm_dead_engine_is_unhealthy_and_fails_running_streams_with_503() -> None:
    engine, llm = await vllm_engine(token_delay_s=0.005)
    stream = engine.generate(request(max_tokens=32))
    await anext(stream)
    llm.kill()
    with pytest.raises(EngineUnavailableError):
        async for _ in stream:
            pass
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()


def test_vllm_tensor_parallel_uses_the_multiprocessing_executor() -> None:
    one = engine_args_kwargs(VLLMEngineConfig(kind="vllm", model="m"))
    two = engine_args_kwargs(VLLMEngineConfig(kind="vllm", model="m", tensor_parallel_size=2))
    assert "distributed_executor_backend" not in one and two["distributed_executor_backend"] == "mp"
    mine = VLLMEngineConfig(kind="vllm", model="m", tensor_parallel_size=2, extra_engine_args={"distributed_executor_backend": "ray"})
    assert engine_args_kwargs(mine)["distributed_executor_backend"] == "ray"


# --- SGLang ------------------------------------------------------------------------------


async def test_sglang_streams_incrementally_by_default() -> None:
    engine, fake = await sglang_engine()
    assert fake.incremental
    chunks = [c async for c in engine.generate(request(max_tokens=6))]
    assert len("".join(c.text for c in chunks).split()) == 6
    cumulative, fake2 = await _sglang_with(incremental_streaming_output=False)
    assert not fake2.incremental
    assert await _text(cumulative, request(max_tokens=6)) == "".join(c.text for c in chunks)


async def test_sglang_health_generates_one_token_and_a_dead_scheduler_is_unhealthy() -> None:
    engine, fake = await sglang_engine()
    await engine.check_health()
    probe = fake.calls[-1]
    assert probe["sampling_params"]["max_new_tokens"] == 1 and probe["stream"] is False
    fake.kill()
    with pytest.raises(EngineUnavailableError, match="within"):
        await engine.check_health()
    assert fake.calls[-1]["rid"].startswith("health-")


async def test_sglang_prefix_abort_only_hits_the_request_closed() -> None:
    engine, fake = await sglang_engine(token_delay_s=0.005)
    keep = asyncio.create_task(_text(engine, request(max_tokens=20)))
    stream = engine.generate(request(max_tokens=40))
    await anext(stream)
    await stream.aclose()
    assert await keep  # the other request ran to its end
    assert len(fake.aborted) == 1 and fake.orphaned == []
    # the fake's scheduler really matches by prefix: an id that prefixes another aborts both
    other, fake2 = await sglang_engine(token_delay_s=0.01)
    a = await fake2.async_generate(input_ids=[3], sampling_params={"max_new_tokens": 20}, stream=True, rid="ab")
    b = await fake2.async_generate(input_ids=[3], sampling_params={"max_new_tokens": 20}, stream=True, rid="abc")
    await anext(a), await anext(b)
    fake2.tokenizer_manager.abort_request(rid="ab")
    assert sorted(fake2.aborted) == ["ab", "abc"]
    await a.aclose(), await b.aclose()


async def test_sglang_constructor_signal_handlers_are_guarded_off_the_main_thread() -> None:
    with pytest.raises(ValueError, match="main thread"):  # what older SGLang does in a worker thread
        await asyncio.to_thread(FakeSGLangEngine, model_path="m")

    def guarded() -> list[int]:
        with signal_handlers_guarded() as skipped:
            FakeSGLangEngine(model_path="m")
        return skipped

    assert len(await asyncio.to_thread(guarded)) == 1
    engine, _ = await sglang_engine()  # the adapter builds it in a worker thread, guarded
    await engine.check_health()


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1])
async def test_sglang_seed_outside_int64_is_a_400(seed: int) -> None:
    engine, fake = await sglang_engine()
    with pytest.raises(InvalidRequestError) as info:
        await _text(engine, request(seed=seed))
    assert info.value.param == "seed" and fake.calls == []


def test_gpu_profile_switches_to_sglang_by_kind_alone() -> None:
    raw = yaml.safe_load((PROFILES / "gpu.yaml").read_text())
    switched = 0
    for model in raw["models"]:
        for version in model["versions"]:
            if version["engine"]["kind"] == "vllm":
                version["engine"]["kind"] = "sglang"
                switched += 1
    config = resolve_config(inline=raw)  # the loader: schema and cross-field rules
    engines = [v.engine for m in config.models for v in m.versions if v.engine.kind == "sglang"]
    assert switched == len(engines) >= 5
    for engine in engines:
        kwargs = engine_kwargs(engine)
        assert set(kwargs) <= SERVER_ARGS  # only real ServerArgs names reach sglang.Engine
        assert kwargs["max_running_requests"] and kwargs["context_length"] and 0 < kwargs["mem_fraction_static"] < 1


# --- raw prompts (/v1/completions), both engines -------------------------------------------


def raw(prompt: str, max_tokens: int = 8, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(request_id="r", messages=(), sampling=SamplingParams(max_tokens=max_tokens, **sampling), prompt=prompt)


async def _on(kind: str, **knobs: Any) -> tuple[Any, Any, Any]:
    """(adapter, the fake library engine, a function giving the prompt ids of call ``i``)."""
    if kind == "vllm":
        engine, llm = await vllm_engine(**knobs)
        return engine, llm, lambda i: llm.calls[i][0]
    engine, fake = await sglang_engine(**knobs)
    return engine, fake, lambda i: fake.calls[i]["input_ids"]


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_raw_prompt_is_sent_as_is_without_template_or_system_prompt(kind: str) -> None:
    engine, fake, prompt_ids = await _on(kind, system_prompt="Be brief.")
    assert engine.capabilities.raw_prompt
    chunks = [c async for c in engine.generate(raw("Once upon a time", logprobs=True))]
    tokenizer = fake.tokenizer if kind == "vllm" else fake.tokenizer_manager.tokenizer
    # the text as the engine itself would encode it (special tokens, i.e. BOS, included)
    assert prompt_ids(0) == tokenizer.encode("Once upon a time", add_special_tokens=True) == [1, *prompt_ids(0)[1:]]
    assert tokenizer.decode(prompt_ids(0)[1:]).split() == ["Once", "upon", "a", "time"]
    text = "".join(c.text for c in chunks)
    assert len(text.split()) == 8 and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5
    assert sum(len(c.logprobs) for c in chunks) == 8
    await _text(engine, request())  # a chat request still gets the template and the system prompt
    chat = tokenizer.decode(prompt_ids(1)).split()
    assert chat[:3] == ["<|system|>", "Be", "brief."] and chat[-1] == "<|assistant|>"


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_raw_prompt_too_long_is_a_400_naming_prompt(kind: str) -> None:
    engine, _, _ = await _on(kind, **({"max_model_len": 4} if kind == "vllm" else {"context_length": 4}))
    with pytest.raises(ContextLengthExceededError) as info:
        await _text(engine, raw("one two three four five six"))
    assert info.value.param == "prompt" and info.value.http_status == 400
    with pytest.raises(ContextLengthExceededError) as chat:
        await _text(engine, request())
    assert chat.value.param == "messages"


# --- top_logprobs, both engines ------------------------------------------------------------


def _top_declared(engine: Any) -> Any:
    """This instance declares ``top_logprobs``: the class follows cluster/capabilities.py's
    table, which does not list it for vllm and sglang yet (a no-op once it does)."""
    engine.capabilities = dataclasses.replace(engine.capabilities, params=engine.capabilities.params | {"top_logprobs"})
    return engine


@pytest.mark.parametrize("kind", ["vllm", "sglang", "sglang-cumulative"])
@pytest.mark.parametrize("k", [1, 3, 20])
async def test_top_logprobs_are_the_engines_alternatives_most_likely_first(kind: str, k: int) -> None:
    if kind == "sglang-cumulative":
        engine, fake = await _sglang_with(incremental_streaming_output=False)
    else:
        engine, fake, _ = await _on(kind)
    chunks = [c async for c in _top_declared(engine).generate(request(max_tokens=8, logprobs=True, top_logprobs=k))]
    asked = fake.calls[0][1].logprobs if kind == "vllm" else fake.calls[0]["top_logprobs_num"]
    assert asked == k
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 8
    for n, lp in enumerate(lps, start=1):
        values = [v for _, v in lp.top]
        assert len(lp.top) == k and values == sorted(values, reverse=True) and all(t.startswith(" ") for t, _ in lp.top)
        if n % 3:  # the sampled token is the most likely one
            assert lp.top[0] == (lp.token, lp.logprob)
        else:  # every third one is second: with k=1 it is not among the alternatives
            assert lp.top[0][0] != lp.token and lp.top[0][1] > lp.logprob
            assert k == 1 or lp.top[1] == (lp.token, lp.logprob)


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_no_alternatives_unless_asked(kind: str) -> None:
    engine, fake, _ = await _on(kind)
    chunks = [c async for c in engine.generate(request(logprobs=True))]
    assert all(lp.top == () for c in chunks for lp in c.logprobs) and any(c.logprobs for c in chunks)
    assert (fake.calls[0][1].logprobs == 0) if kind == "vllm" else (fake.calls[0]["top_logprobs_num"] is None)


def test_vllm_top_logprobs_leave_out_a_sampled_token_outside_the_top_k() -> None:
    # vLLM's dict: the sampled token first (rank 3 here), then ranks 1..2
    position = {9: Logprob(-2.0, 3, " c"), 4: Logprob(-0.1, 1, " a"), 5: Logprob(-1.0, 2, " b")}
    (lp,) = token_logprobs([9], [position], top=2)
    assert (lp.token, lp.logprob, lp.top) == (" c", -2.0, ((" a", -0.1), (" b", -1.0)))
    assert token_logprobs([9], [position])[0].top == ()


async def test_vllm_more_than_max_logprobs_is_a_400() -> None:
    engine, llm = await vllm_engine()
    with pytest.raises(InvalidRequestError, match="max allowed: 20"):
        await _text(_top_declared(engine), request(logprobs=True, top_logprobs=21))
    assert llm.running == {}


async def _sglang_with(**extra: Any) -> tuple[SGLangEngine, FakeSGLangEngine]:
    made: list[FakeSGLangEngine] = []
    config = SGLangEngineConfig(kind="sglang", model_path="fake/tiny", extra_engine_args=extra)
    engine = SGLangEngine(config, engine_factory=lambda **kw: made.append(FakeSGLangEngine(**kw)) or made[0])
    await engine.start()
    return engine, made[0]


async def _text(engine: Any, req: GenerationRequest) -> str:
    return "".join([c.text async for c in engine.generate(req)])





# --- n > 1 and tools on vLLM -------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


async def _vllm(tool_parser: str | None = None, **knobs: Any) -> tuple[VLLMEngine, FakeAsyncLLM]:
    config = VLLMEngineConfig(kind="vllm", model="fake/tiny", tool_parser=tool_parser)
    engine = VLLMEngine(config, engine_factory=lambda cfg: fake_vllm_backend(cfg, **knobs))
    await engine.start()
    return engine, engine._backend.llm  # type: ignore[union-attr,return-value]


def _by_index(chunks: list[Any]) -> dict[int, ChoiceParts]:
    parts: dict[int, ChoiceParts] = {}
    for chunk in chunks[:-1]:
        assert chunk.text or chunk.tool_calls, chunk  # every chunk but the last carries something
        parts.setdefault(chunk.index, ChoiceParts()).add(chunk)
    return parts


async def test_vllm_n_choices_each_with_its_text_finish_and_usage() -> None:
    engine, llm = await _vllm(answer_tokens=12)
    req = request(max_tokens=10, n=3, temperature=0.7, seed=5, logprobs=True)
    chunks = [c async for c in engine.generate(req)]
    prompt_ids, params, _ = llm.calls[0]
    assert params.n == 3 and params.seed == 5  # vLLM fans out itself, seed + i per child
    final = chunks[-1]
    assert [c for c in chunks if c.is_final] == [final]
    parts = _by_index(chunks)
    # choice i: 12 - 3i words, then EOS; max_tokens 10 cuts choice 0 only
    for i, expected in enumerate([answer_ids(llm.tokenizer, prompt_ids, 12 - 3 * i, 5 + i) for i in range(3)]):
        assert "".join(parts[i].text) == llm.tokenizer.decode(expected[:10])
        assert [t for t, _, _ in parts[i].logprobs] == [llm.tokenizer.token_text(t) for t in expected[:10]]
    assert final.finish_reasons == ("length", "stop", "stop") and final.finish_reason == "length"
    assert final.usage == Usage(prompt_tokens=len(prompt_ids), completion_tokens=10 + 10 + 7)  # EOS tokens counted, prompt once
    # odd choices move every other step: some steps carry only some choices, interleaved
    order = [c.index for c in chunks[:-1]]
    assert order != sorted(order)


async def test_vllm_n_choices_stop_strings_per_choice() -> None:
    engine, llm = await _vllm(answer_tokens=12)
    chunks = [c async for c in engine.generate(request(max_tokens=10, n=2, temperature=0.7, seed=1, stop=(" primes",)))]
    parts = _by_index(chunks)
    assert all(" primes" not in "".join(p.text) for p in parts.values())
    assert len(chunks[-1].finish_reasons) == 2


async def test_vllm_n_choices_close_early_aborts_all_of_them_once() -> None:
    engine, llm = await _vllm(token_delay_s=0.005)
    stream = engine.generate(request(max_tokens=32, n=4))
    await anext(stream)
    await stream.aclose()
    assert llm.aborted == [llm.calls[0][2]] and set(llm.abort_calls) == {llm.calls[0][2]} and llm.running == {}


async def test_vllm_n_choices_engine_side_abort_is_a_503() -> None:
    engine, llm = await _vllm(token_delay_s=0.005)
    stream = engine.generate(request(max_tokens=32, n=2))
    await anext(stream)
    llm.engine_abort(llm.calls[0][2])
    with pytest.raises(EngineUnavailableError):
        async for _ in stream:
            pass


def _hermes(*calls: tuple[str, dict[str, Any]], before: str = "") -> str:
    text = before + "".join(f" <tool_call> {json.dumps({'name': n, 'arguments': a})} </tool_call>" for n, a in calls)
    return text


async def test_vllm_tools_without_a_parser_are_a_400_naming_tools() -> None:
    engine, llm = await _vllm()
    assert not {"tools", "tool_choice"} & engine.capabilities.params
    with pytest.raises(InvalidRequestError) as info:
        await _text(engine, request(tools=(WEATHER,)))
    assert (info.value.param, info.value.code, info.value.http_status) == ("tools", "unsupported_parameter", 400)
    assert llm.calls == []


@pytest.mark.parametrize("before", ["", "Let me check."])
async def test_vllm_tool_parser_turns_the_answer_into_streamed_call_pieces(before: str) -> None:
    script = _hermes(("weather", {"city": "Paris"}), ("time", {"zone": "CET"}), before=before)
    engine, llm = await _vllm("hermes", script=lambda ids, params, i: script)
    assert {"tools", "tool_choice"} <= engine.capabilities.params
    chunks = [c async for c in engine.generate(request(max_tokens=64, tools=(WEATHER, TIME), tool_choice="auto", logprobs=True))]
    assert llm.tokenizer.tools_seen == [[WEATHER, TIME]]  # the template described the tools
    assert llm.calls[0][1].skip_special_tokens is False  # the parser's adjust_request
    pieces = [p for c in chunks for p in c.tool_calls]
    assert len(pieces) > 4  # streamed: name first, arguments in several pieces
    firsts = [p for p in pieces if p.id is not None]
    assert [(p.index, p.name) for p in firsts] == [(0, "weather"), (1, "time")]
    assert all(p.name is None for p in pieces if p.id is None)
    parts = _by_index(chunks)
    calls = parts[0].tool_calls()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("weather", {"city": "Paris"}), ("time", {"zone": "CET"})]
    assert len({c["id"] for c in calls}) == 2
    assert "".join(parts[0].text).strip() == before
    assert all("tool_call" not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "tool_calls"


async def test_vllm_tool_parser_per_choice() -> None:
    script = _hermes(("weather", {"city": "Oslo"}))
    engine, _ = await _vllm("hermes", script=lambda ids, params, i: script if i == 1 else None, answer_tokens=6)
    chunks = [c async for c in engine.generate(request(max_tokens=64, n=2, tools=(WEATHER,)))]
    parts = _by_index(chunks)
    assert not parts[0].calls and "".join(parts[0].text)
    assert [json.loads(c["function"]["arguments"]) for c in parts[1].tool_calls()] == [{"city": "Oslo"}]
    assert chunks[-1].finish_reasons == ("stop", "tool_calls")


async def test_vllm_named_tool_choice_constrains_decoding_to_its_parameters() -> None:
    engine, llm = await _vllm("hermes")
    choice = {"type": "function", "function": {"name": "weather"}}
    chunks = [c async for c in engine.generate(request(max_tokens=64, tools=(WEATHER, TIME), tool_choice=choice))]
    assert llm.calls[0][1].structured_outputs == {"json": WEATHER["function"]["parameters"]}
    (call,) = _by_index(chunks)[0].tool_calls()
    assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls" and not any(c.text for c in chunks)


async def test_vllm_required_tool_choice_is_an_array_of_calls() -> None:
    engine, llm = await _vllm("hermes")
    chunks = [c async for c in engine.generate(request(max_tokens=64, tools=(WEATHER, TIME), tool_choice="required"))]
    schema = llm.calls[0][1].structured_outputs["json"]
    assert schema["type"] == "array" and [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]] == [["weather"], ["time"]]
    (call,) = _by_index(chunks)[0].tool_calls()
    assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls"


async def test_vllm_tool_choice_none_answers_in_text() -> None:
    engine, llm = await _vllm("hermes", script=lambda ids, params, i: _hermes(("weather", {"city": "Rome"})))
    chunks = [c async for c in engine.generate(request(max_tokens=64, tools=(WEATHER,), tool_choice="none"))]
    assert not any(c.tool_calls for c in chunks) and "<tool_call>" in "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop" and llm.calls[0][1].structured_outputs is None


# --- n > 1 on SGLang: one SGLang request per choice ----------------------------------------


async def test_sglang_n_choices_fan_out_each_with_its_rid_seed_text_and_finish() -> None:
    engine, fake = await sglang_engine()
    chunks = [c async for c in engine.generate(request(max_tokens=8, n=3, temperature=0.7, seed=11, stop=(" three",)))]
    calls = fake.calls
    rids = [c["rid"] for c in calls]
    assert len(set(rids)) == 3 and len({len(r) for r in rids}) == 1  # fixed length: none prefixes another
    assert [c["sampling_params"].get("sampling_seed") for c in calls] == [11, 12, 13]
    assert all("n" not in c["sampling_params"] for c in calls)
    parts = _by_index(chunks)
    reasons, tokens = [], 0
    for i, call in enumerate(calls):
        words = answer_ids(fake.tokenizer_manager.tokenizer, call["input_ids"], fake.answer_tokens, 11 + i)[:8]
        text = fake.tokenizer_manager.tokenizer.decode(words)
        cut = text.find(" three")
        assert "".join(parts[i].text) == (text[:cut] if cut >= 0 else text)
        reasons.append("stop" if cut >= 0 else "length")
        tokens += next(n for n in range(1, 9) if cut < 0 and n == 8 or cut >= 0 and len(fake.tokenizer_manager.tokenizer.decode(words[:n])) > cut)
    final = chunks[-1]
    assert final.finish_reasons == tuple(reasons) == ("length", "length", "stop")
    assert final.usage is not None and final.usage.completion_tokens == tokens and final.usage.prompt_tokens == len(calls[0]["input_ids"])
    assert [c for c in chunks if c.is_final] == [final]


async def test_sglang_n_choices_close_early_aborts_every_choice() -> None:
    engine, fake = await sglang_engine(token_delay_s=0.005)
    stream = engine.generate(request(max_tokens=32, n=3))
    await anext(stream)
    await stream.aclose()
    assert set(fake.aborted) == {c["rid"] for c in fake.calls} and fake.orphaned == []  # a second abort of a live rid is harmless


async def test_sglang_n_choices_one_aborted_by_the_engine_is_a_503_and_the_others_are_aborted() -> None:
    engine, fake = await sglang_engine(token_delay_s=0.005)
    stream = engine.generate(request(max_tokens=32, n=3))
    await anext(stream)
    fake.tokenizer_manager.abort_request(rid=fake.calls[1]["rid"])
    with pytest.raises(EngineUnavailableError):
        async for _ in stream:
            pass
    assert set(fake.aborted) == {c["rid"] for c in fake.calls} and fake.orphaned == []  # a second abort of a live rid is harmless


# --- tools on SGLang ---------------------------------------------------------------------


async def _sglang_tools(tool_parser: str | None = "hermes", **knobs: Any) -> tuple[SGLangEngine, FakeSGLangEngine]:
    made: list[FakeSGLangEngine] = []
    config = SGLangEngineConfig(kind="sglang", model_path="fake/tiny", tool_call_parser=tool_parser)
    engine = SGLangEngine(config, engine_factory=lambda **kw: made.append(FakeSGLangEngine(**knobs, **kw)) or made[0],
                          tool_parser_factory=fake_function_call_parser)
    await engine.start()
    return engine, made[0]


async def test_sglang_tools_without_a_parser_are_a_400_naming_tools() -> None:
    engine, fake = await _sglang_tools(None)
    assert not {"tools", "tool_choice"} & engine.capabilities.params
    with pytest.raises(InvalidRequestError) as info:
        await _text(engine, request(tools=(WEATHER,), tool_choice="required"))
    assert (info.value.param, info.value.http_status) == ("tools", 400) and fake.calls == []


async def test_sglang_unknown_tool_parser_fails_start() -> None:
    with pytest.raises(EngineError, match="Unsupported tool_call_parser"):
        await _sglang_tools("nope")


@pytest.mark.parametrize("before", ["", "Checking."])
async def test_sglang_tool_parser_turns_the_answer_into_streamed_call_pieces(before: str) -> None:
    script = _hermes(("weather", {"city": "Paris"}), ("time", {"zone": "CET"}), before=before)
    engine, fake = await _sglang_tools(script=lambda ids, params: script)
    assert {"tools", "tool_choice"} <= engine.capabilities.params
    chunks = [c async for c in engine.generate(request(max_tokens=64, tools=(WEATHER, TIME)))]
    assert fake.tokenizer_manager.tokenizer.tools_seen == [[WEATHER, TIME]]
    pieces = [p for c in chunks for p in c.tool_calls]
    assert len(pieces) > 4 and [(p.index, p.name) for p in pieces if p.id is not None] == [(0, "weather"), (1, "time")]
    parts = _by_index(chunks)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parts[0].tool_calls()] == [
        ("weather", {"city": "Paris"}), ("time", {"zone": "CET"})]
    assert "".join(parts[0].text).strip() == before and chunks[-1].finish_reason == "tool_calls"


async def test_sglang_text_answer_with_tools_stays_text() -> None:
    engine, fake = await _sglang_tools()
    chunks = [c async for c in engine.generate(request(max_tokens=8, tools=(WEATHER,), tool_choice="auto"))]
    assert not any(c.tool_calls for c in chunks) and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == fake.tokenizer_manager.tokenizer.decode(
        answer_ids(fake.tokenizer_manager.tokenizer, fake.calls[0]["input_ids"], fake.answer_tokens)[:8])


@pytest.mark.parametrize(("choice", "schema_type"), [({"type": "function", "function": {"name": "weather"}}, "object"), ("required", "array")])
async def test_sglang_forced_tool_choice_constrains_decoding(choice: Any, schema_type: str) -> None:
    engine, fake = await _sglang_tools()
    chunks = [c async for c in engine.generate(request(max_tokens=64, n=2, tools=(WEATHER, TIME), tool_choice=choice))]
    assert json.loads(fake.calls[0]["sampling_params"]["json_schema"])["type"] == schema_type
    parts = _by_index(chunks)
    for i in (0, 1):
        (call,) = parts[i].tool_calls()
        assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1].finish_reasons == ("tool_calls", "tool_calls")


async def test_sglang_n_choices_cancelling_the_consumer_aborts_every_choice() -> None:
    engine, fake = await sglang_engine(token_delay_s=0.005)
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(max_tokens=32, n=3)):
            got.set()

    task = asyncio.ensure_future(consume())
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(fake.aborted) == {c["rid"] for c in fake.calls} and fake.orphaned == []
