"""Contract factory for the ``sglang`` adapter on ``tests/fakes/sglang_engine.py``.

The engine object is built by the adapter itself (``engine_factory``), in a worker thread,
from ``engine_kwargs(config)``: the fake refuses names ``ServerArgs`` lacks and installs its
signal handler as older SGLang does, so both checks are part of the contract run.
``broken`` brings a system prompt longer than the context: SGLang's ``ValueError``, our
``ContextLengthExceededError`` (400). ``aborted`` counts the requests SGLang's scheduler
aborted.
"""

from __future__ import annotations

import functools

from cluster.config import SGLangEngineConfig
from cluster.errors import ContextLengthExceededError
from deployments.engines.sglang import SGLangEngine
from tests.contract.harness import EngineUnderTest
from tests.fakes.sglang_engine import FakeSGLangEngine

CONTEXT = 1024


async def make() -> EngineUnderTest:
    config = SGLangEngineConfig(kind="sglang", model_path="fake/tiny", context_length=CONTEXT, health_check_timeout_s=2.0)
    built: list[FakeSGLangEngine] = []

    def factory(**kwargs: object) -> FakeSGLangEngine:
        built.append(FakeSGLangEngine(answer_tokens=96, token_delay_s=0.002, **kwargs))
        return built[-1]

    engine = SGLangEngine(config, system_prompt="Be brief.", engine_factory=factory)
    broken = SGLangEngine(config, system_prompt="word " * (CONTEXT + 8), engine_factory=functools.partial(FakeSGLangEngine, token_delay_s=0.002))
    await engine.start()
    await broken.start()

    async def close() -> None:
        await engine.shutdown()
        await broken.shutdown()

    return EngineUnderTest(
        engine=engine, aborted=lambda: len(built[0].aborted), broken=broken, close=close,
        broken_error=ContextLengthExceededError, broken_status=400,
    )
