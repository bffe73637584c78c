"""Contract factory for the ``vllm`` adapter.

By default the adapter runs on ``tests/fakes/vllm_engine.py`` (no vLLM, no GPU). With
``SLM_CONTRACT_VLLM_MODEL`` set (``scripts/gpu_smoke.sh`` sets it) it loads that model in real
vLLM instead; the suite then needs a CUDA GPU and the ``vllm`` extra. The real engine is loaded
once per process and shared by the tests, so run them on one event loop
(``-o asyncio_default_test_loop_scope=session``): vLLM's output handler lives on the loop
that first used it. It is shut down when the process exits.

``broken`` shares the engine but brings a system prompt longer than the model's context, so
its requests are refused by the engine's own validation: a ``ContextLengthExceededError`` (400).
``aborted`` counts the adapter's calls of ``AsyncLLM.abort`` for requests still running.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
from typing import Any

from cluster.config import VLLMEngineConfig
from cluster.errors import ContextLengthExceededError
from deployments.engines.vllm import VLLMBackend, VLLMEngine, load_vllm_backend
from tests.contract.harness import EngineUnderTest
from tests.fakes.vllm_engine import fake_vllm_backend

MAX_MODEL_LEN = 1024
_real: list[VLLMBackend] = []  # the real engine, loaded once


class _Counting:
    """Wraps the engine object: counts ``abort`` calls that end a running request; ``shutdown``
    only from the owner, so the shared engine is stopped once."""

    def __init__(self, llm: Any, *, owner: bool) -> None:
        self._llm, self._owner, self.aborts = llm, owner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._llm.generate(*args, **kwargs)

    async def abort(self, request_id: str, *args: Any, **kwargs: Any) -> None:
        self.aborts += 1
        await self._llm.abort(request_id, *args, **kwargs)

    def shutdown(self) -> None:
        if self._owner:
            self._llm.shutdown()


async def make() -> EngineUnderTest:
    model = os.environ.get("SLM_CONTRACT_VLLM_MODEL")
    config = VLLMEngineConfig(
        kind="vllm", model=model or "fake/tiny", max_model_len=MAX_MODEL_LEN,
        gpu_memory_utilization=float(os.environ.get("SLM_CONTRACT_VLLM_GPU_MEMORY", "0.5")), enforce_eager=True,
    )
    if model:
        if not _real:
            _real.append(await asyncio.to_thread(load_vllm_backend, config))
            atexit.register(_real[0].llm.shutdown)
        backend = _real[0]
    else:
        backend = await asyncio.to_thread(functools.partial(fake_vllm_backend, answer_tokens=96, token_delay_s=0.002), config)
    counting = _Counting(backend.llm, owner=not model)
    shared = VLLMBackend(llm=_Counting(backend.llm, owner=False), make_sampling_params=backend.make_sampling_params)  # type: ignore[arg-type]
    engine = VLLMEngine(config, system_prompt="Be brief.", engine_factory=lambda _: VLLMBackend(counting, backend.make_sampling_params))  # type: ignore[arg-type]
    broken = VLLMEngine(config, system_prompt="word " * (MAX_MODEL_LEN + 8), engine_factory=lambda _: shared)
    await engine.start()
    await broken.start()

    async def close() -> None:
        await broken.shutdown()
        await engine.shutdown()

    return EngineUnderTest(
        engine=engine, aborted=lambda: counting.aborts, broken=broken, close=close,
        broken_error=ContextLengthExceededError, broken_status=400,
    )

