from __future__ import annotations

from cluster.config import FakeEngineConfig
from cluster.errors import EngineError
from deployments.engines.fake import FakeEngine
from tests.contract.harness import EngineUnderTest


async def make() -> EngineUnderTest:
    engine = FakeEngine(FakeEngineConfig(kind="fake", tokens_per_s=200, default_completion_tokens=64), system_prompt="Be brief.")
    broken = FakeEngine(FakeEngineConfig(kind="fake", failure_rate=1.0))
    await engine.start()
    await broken.start()

    async def close() -> None:
        await engine.shutdown()
        await broken.shutdown()

    return EngineUnderTest(engine=engine, aborted=lambda: engine.aborted, broken=broken, close=close,
                          broken_error=EngineError, broken_status=502)
