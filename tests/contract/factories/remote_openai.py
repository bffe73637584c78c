"""The remote_openai adapter against the fake OpenAI upstream (a real HTTP server on loopback)."""

from __future__ import annotations

import asyncio

from cluster.config import RemoteOpenAIEngineConfig
from cluster.errors import EngineError
from deployments.engines.remote_openai import RemoteOpenAIEngine
from tests.contract.harness import EngineUnderTest
from tests.fakes.openai_upstream import OpenAIUpstream


def _config(base_url: str) -> RemoteOpenAIEngineConfig:
    return RemoteOpenAIEngineConfig(
        kind="remote_openai", base_url=base_url, model="frontier", api_key_env="CONTRACT_UPSTREAM_KEY",
        connect_timeout_s=2, read_timeout_s=5, total_timeout_s=10, max_connections=8,
    )


async def make() -> EngineUnderTest:
    # 64 natural tokens 5 ms apart: a stream is still running when the abort test closes it.
    upstream = OpenAIUpstream(answer_tokens=64, token_delay_s=0.005, api_key="sk-contract").start()
    failing = OpenAIUpstream(status=500).start()
    env = {"CONTRACT_UPSTREAM_KEY": "sk-contract"}
    engine = RemoteOpenAIEngine(_config(upstream.base_url), system_prompt="Be brief.", env=env)
    broken = RemoteOpenAIEngine(_config(failing.base_url), env=env)
    await engine.start()
    await broken.start()

    async def close() -> None:
        await engine.shutdown()
        await broken.shutdown()
        await asyncio.to_thread(upstream.stop)  # joins the server thread; keep the loop free
        await asyncio.to_thread(failing.stop)

    return EngineUnderTest(engine=engine, aborted=lambda: upstream.disconnected, broken=broken, close=close,
                          broken_error=EngineError, broken_status=502)
