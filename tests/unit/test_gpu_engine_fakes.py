"""The vLLM and SGLang adapters against the library-shaped fakes in ``tests/fakes/``: what the
issue's review found (engine-side aborts, seeds, health, signal handlers, tokenising off the
event loop, config names), raw prompts (/v1/completions), top_logprobs, and how the fakes
themselves behave like the libraries."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import SGLangEngineConfig, VLLMEngineConfig
from cluster.errors import ContextLengthExceededError, EngineUnavailableError, InvalidRequestError
from cluster.loader import resolve_config
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.engines.gpu_common import SEED_MAX, SEED_MIN, signal_handlers_guarded
from deployments.engines.sglang import SGLangEngine, engine_kwargs
from deployments.engines.vllm import VLLMEngine, engine_args_kwargs, token_logprobs
from tests.fakes.sglang_engine import SERVER_ARGS, FakeSGLangEngine
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



