"""The hf engine beyond the contract suite: locating artifacts, the chat template, stop
conditions, detokenizing, and that concurrent requests really share forward passes.

Runs the real SmolLM2-135M-Instruct (loaded once, shared with the contract factory). No
timing assertions: the benchmark (``benchmarks/hf_batching.py``) measures speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cluster.errors import ArtifactError, ContextLengthExceededError, EngineError, EngineUnavailableError
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine, IncrementalDetokenizer
from deployments.engines.hf_loading import LoadedModel, locate_model
from tests.contract.factories.hf import require_model, shared_loader, smollm_config


def _request(text: str, max_tokens: int = 12, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="t", messages=(ChatMessage("user", text),), sampling=SamplingParams(max_tokens=max_tokens, **sampling)
    )


async def _collect(engine: HFEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(request)]


def _text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


async def _started(loader: Any = shared_loader, **overrides: Any) -> HFEngine:
    require_model()
    engine = HFEngine(smollm_config(**overrides), system_prompt="Be brief.", loader=loader)
    await engine.start()
    return engine


@pytest.fixture
async def engine() -> HFEngine:
    made = await _started()
    yield made
    await made.shutdown()


# --- locating artifacts --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"gguf_package": "no_such_package_for_hf_tests"},
        {"gguf_package": None, "model_path": "/no/such/model/folder"},
        {"gguf_file": "missing.Q4_1.gguf"},
    ],
    ids=["missing-package", "bad-path", "named-gguf-missing"],
)
async def test_missing_artifacts_fail_start_with_artifact_error(overrides: dict[str, Any]) -> None:
    engine = HFEngine(smollm_config(**overrides))
    with pytest.raises(ArtifactError):
        await engine.start()
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()


async def test_package_without_gguf_is_an_artifact_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hf_test_empty_pkg").mkdir()
    (tmp_path / "hf_test_empty_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ArtifactError, match="no \\*.gguf"):
        await HFEngine(smollm_config(gguf_package="hf_test_empty_pkg")).start()


def test_several_ggufs_need_a_name(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ArtifactError, match="several GGUF"):
        locate_model(smollm_config(gguf_package=None, model_path=str(tmp_path)))
    assert locate_model(smollm_config(gguf_package=None, model_path=str(tmp_path), gguf_file="b.gguf")).gguf_file == "b.gguf"


async def test_corrupt_gguf_is_an_artifact_error(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"this is not a gguf file")
    with pytest.raises(ArtifactError):
        await HFEngine(smollm_config(gguf_package=None, model_path=str(tmp_path / "broken.gguf"))).start()


def test_packaged_gguf_is_found_without_importing_the_package() -> None:
    require_model()
    source = locate_model(smollm_config())
    assert source.gguf_file and source.gguf_file.endswith(".gguf")
    assert (Path(source.folder) / source.gguf_file).is_file()
    as_file = locate_model(smollm_config(gguf_package=None, model_path=str(Path(source.folder) / source.gguf_file)))
    assert as_file == source


# --- prompts and stop conditions -----------------------------------------------------


async def test_chat_template_is_applied_with_the_system_prompt(engine: HFEngine) -> None:
    tokenizer = shared_loader(smollm_config()).tokenizer
    prompt = tokenizer.decode(engine.encode(_request("Hello there")))
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>user\nHello there<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    own = GenerationRequest("t", (ChatMessage("system", "Talk like a pirate."), ChatMessage("user", "Hi")))
    assert "Be brief." not in tokenizer.decode(engine.encode(own))


async def test_prompt_over_the_context_is_a_typed_error(engine: HFEngine) -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        await _collect(engine, _request("word " * 3000))
    assert info.value.param == "messages" and info.value.http_status == 400


async def test_stops_at_the_end_of_turn_token(engine: HFEngine) -> None:
    chunks = await _collect(engine, _request("Say hello.", max_tokens=200))
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens < 200
    assert "<|im_end|>" not in _text(chunks) and _text(chunks).strip()


async def test_stop_string_cuts_the_answer(engine: HFEngine) -> None:
    full = _text(await _collect(engine, _request("Name three prime numbers.", max_tokens=24)))
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    cut = await _collect(engine, _request("Name three prime numbers.", max_tokens=24, stop=(stop,)))
    assert _text(cut) == full[: full.index(stop)]
    assert cut[-1].finish_reason == "stop"


async def test_logprobs_cover_every_token(engine: HFEngine) -> None:
    chunks = await _collect(engine, _request("Write a poem about the sea.", max_tokens=10, logprobs=True))
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert chunks[-1].finish_reason == "length"
    assert len(logprobs) == chunks[-1].usage.completion_tokens == 10
    assert all(lp.logprob <= 0 for lp in logprobs)
    assert "".join(lp.token for lp in logprobs) == _text(chunks)


async def test_seeded_sampling_is_reproducible(engine: HFEngine) -> None:
    request = _request("Tell me a story.", max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    first, second = await _collect(engine, request), await _collect(engine, request)
    assert _text(first) == _text(second) and _text(first).strip()


def test_detokenizer_never_splits_multibyte_characters() -> None:
    require_model()
    tokenizer = shared_loader(smollm_config()).tokenizer
    text = "Grüße aus 世界, naïve café 🙂🚀 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


# --- batching ------------------------------------------------------------------------


async def test_requests_arriving_together_share_forward_passes() -> None:
    engine = await _started(batch_wait_ms=100)
    try:
        prompts = ["Name three prime numbers.", "What is the capital of France?", "Write a haiku.", "Count to five."]
        results = await asyncio.gather(*(_collect(engine, _request(p, max_tokens=8)) for p in prompts))
        assert all(r[-1].usage is not None for r in results)
        assert engine.stats.max_decode_rows == 4
        assert engine.stats.prefill_passes == 1
        assert engine.stats.decode_passes < sum(r[-1].usage.completion_tokens for r in results)
    finally:
        await engine.shutdown()


async def test_batched_answers_equal_solo_answers(engine: HFEngine) -> None:
    # Different prompt lengths (left padding); the longest prompt stops first, so its
    # columns are trimmed from the cache while the others go on.
    cases = [
        ("Hi", 16),
        ("Name three prime numbers.", 16),
        ("Explain in one paragraph why the sky is blue and why sunsets are red and orange.", 5),
    ]
    requests = [_request(p, max_tokens=n, logprobs=True) for p, n in cases]
    solo = [await _collect(engine, r) for r in requests]

    async def join_late(i: int, request: GenerationRequest) -> list[GenerationChunk]:
        await asyncio.sleep(0.3 * i)  # later requests join the running batch mid-flight
        return await _collect(engine, request)

    batched = await asyncio.gather(*(join_late(i, r) for i, r in enumerate(requests)))
    assert engine.stats.joins >= 1
    together = await asyncio.gather(*(_collect(engine, r) for r in requests))
    assert engine.stats.max_decode_rows == 3
    for alone, *others in zip(solo, batched, together):
        for other in others:
            assert _text(other) == _text(alone)
            assert other[-1] == alone[-1]
            got = [lp.logprob for c in other for lp in c.logprobs]
            assert got == pytest.approx([lp.logprob for c in alone for lp in c.logprobs], abs=1e-4)


async def test_more_requests_than_max_batch_size_wait_their_turn() -> None:
    engine = await _started(max_batch_size=2)
    try:
        results = await asyncio.gather(*(_collect(engine, _request(f"Count to {n}.", max_tokens=4)) for n in range(5)))
        assert all(r[-1].usage is not None for r in results)
        assert engine.stats.max_decode_rows <= 2 and engine.stats.completed == 5
    finally:
        await engine.shutdown()


async def test_closing_a_stream_drops_its_row(engine: HFEngine) -> None:
    long = _request("Write a long story about a dragon.", max_tokens=64)
    keep, leave = engine.generate(long), engine.generate(long)
    await keep.__anext__()
    await leave.__anext__()
    await leave.aclose()
    assert engine.stats.aborted == 1
    rows_seen = set()
    async for chunk in keep:
        rows_seen.add(engine.stats.active_rows)
    assert chunk.finish_reason is not None
    assert 1 in rows_seen  # the closed stream's row left while the other kept decoding
    assert engine.stats.active_rows == 0


# --- failures and lifecycle ----------------------------------------------------------


class _ExplodingModel:
    """The real model, except that forward passes after the first ``after`` raise."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.config, self.after, self.calls = inner, inner.config, after, 0

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("simulated kernel failure")
        return self.inner(**kwargs)


@pytest.mark.parametrize("good_passes", [0, 3], ids=["in-prefill", "mid-decode"])
async def test_a_failing_decode_loop_fails_every_request_and_the_health_check(good_passes: int) -> None:
    def exploding(config: Any) -> LoadedModel:
        loaded = shared_loader(config)
        return dataclasses.replace(loaded, model=_ExplodingModel(loaded.model, after=good_passes))

    engine = await _started(loader=exploding)
    try:
        results = await asyncio.gather(*(_collect(engine, _request("Count to ten.", max_tokens=32)) for _ in range(3)), return_exceptions=True)
        assert all(type(r) is EngineError for r in results), results
        assert engine.stats.failed == 3
        with pytest.raises(EngineUnavailableError):
            await engine.check_health()
        with pytest.raises(EngineUnavailableError):
            await _collect(engine, _request("Hi"))
    finally:
        await engine.shutdown()


async def test_shutdown_fails_requests_in_flight_and_is_idempotent() -> None:
    engine = await _started()
    stream = engine.generate(_request("Write a long story about a dragon.", max_tokens=64))
    await stream.__anext__()
    await engine.shutdown()
    with pytest.raises(EngineUnavailableError):
        async for _ in stream:
            pass
    await engine.shutdown()
    with pytest.raises(EngineUnavailableError):
        await _collect(engine, _request("Hi"))
    with pytest.raises(EngineUnavailableError):
        await engine.start()
