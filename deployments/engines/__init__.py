"""Engine adapters behind the ``cluster.protocols.Engine`` seam.

Each adapter imports its engine library lazily, inside the adapter, so that importing this
package costs nothing and the GPU engines stay optional extras.
"""

from __future__ import annotations

from cluster.config import EngineConfig
from cluster.protocols import Engine


def create_engine(config: EngineConfig, *, system_prompt: str | None = None) -> Engine:
    """The adapter for ``config.kind``; nothing heavy is imported until here."""
    kind = config.kind
    if kind == "fake":
        from deployments.engines.fake import FakeEngine

        return FakeEngine(config, system_prompt=system_prompt)
    if kind == "hf":
        from deployments.engines.hf import HFEngine

        return HFEngine(config, system_prompt=system_prompt)
    if kind == "remote_openai":
        from deployments.engines.remote_openai import RemoteOpenAIEngine

        return RemoteOpenAIEngine(config, system_prompt=system_prompt)
    if kind == "vllm":
        from deployments.engines.vllm import VLLMEngine

        return VLLMEngine(config, system_prompt=system_prompt)
    if kind == "sglang":
        from deployments.engines.sglang import SGLangEngine

        return SGLangEngine(config, system_prompt=system_prompt)
    raise ValueError(f"unknown engine kind {kind!r}")  # unreachable: the config union is closed
