"""The ``vllm`` adapter on a real model and a real CUDA GPU (``scripts/gpu_smoke.sh`` runs these).

Marked ``gpu``; skipped cleanly where there is no CUDA GPU or no vLLM (``pytest -m "not gpu"``
deselects them outright). The model comes from ``SLM_GPU_MODEL`` (default
Qwen/Qwen2.5-0.5B-Instruct); one engine is loaded for the whole check.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from cluster.config import VLLMEngineConfig
from cluster.errors import ContextLengthExceededError, InvalidRequestError
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.engines.vllm import VLLMEngine


def _cuda() -> bool:
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU and the vllm extra")]

MODEL = os.environ.get("SLM_GPU_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


def _ask(text: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest(request_id="gpu", messages=(ChatMessage("user", text),), sampling=SamplingParams(**sampling))


async def _answer(engine: VLLMEngine, request: GenerationRequest) -> tuple[str, list]:
    chunks = [c async for c in engine.generate(request)]
    return "".join(c.text for c in chunks), chunks


async def test_real_model_answers_aborts_and_refuses_like_the_contract_says() -> None:
    config = VLLMEngineConfig(kind="vllm", model=MODEL, max_model_len=2048, gpu_memory_utilization=0.5, enforce_eager=True)
    engine = VLLMEngine(config)
    await engine.start()
    try:
        await engine.check_health()
        text, chunks = await _answer(engine, _ask("What is the capital of France? Answer in one word.", max_tokens=8, temperature=0.0))
        assert "Paris" in text
        assert chunks[-1].usage.completion_tokens <= 8 and chunks[-1].finish_reason in ("stop", "length")

        _, chunks = await _answer(engine, _ask("Count to ten.", max_tokens=6, temperature=0.0, logprobs=True))
        logprobs = [lp for c in chunks for lp in c.logprobs]
        assert len(logprobs) == chunks[-1].usage.completion_tokens and all(lp.logprob <= 0 for lp in logprobs)

        seeded = [(await _answer(engine, _ask("Write a haiku.", max_tokens=24, temperature=0.9, seed=2**63 - 1)))[0] for _ in range(2)]
        assert seeded[0] == seeded[1]  # the largest int64 seed is accepted and reproducible
        with pytest.raises(InvalidRequestError):
            await _answer(engine, _ask("hi", seed=2**63))

        with pytest.raises(ContextLengthExceededError):
            await _answer(engine, _ask("word " * 3000, max_tokens=4))

        stream = engine.generate(_ask("Tell me a very long story.", max_tokens=512, temperature=0.0))
        await anext(stream)
        await stream.aclose()  # aborts in vLLM; the engine keeps serving
        text, _ = await _answer(engine, _ask("Say OK.", max_tokens=4, temperature=0.0))
        assert text
    finally:
        await engine.shutdown()
