"""ModelServer: one Ray Serve deployment per model version (e.g. ``code-v1``).

Its GPU fraction, autoscaling and ``max_ongoing_requests`` come from the version's config
(see ``deployments.app``); ``check_health`` is wired to the engine so Serve replaces a
replica whose engine died.
"""

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator

from cluster.config import ModelVersionConfig
from cluster.load_signals import LoadTracker
from cluster.types import GenerationChunk, GenerationRequest
from deployments.engines import create_engine
from deployments.stream_batching import batched_chunks

log = logging.getLogger("ray.serve")


class ModelServer:
    async def __init__(self, model: str, version: ModelVersionConfig) -> None:
        self.model = model
        self.version = version
        self.engine = create_engine(version.engine, system_prompt=version.system_prompt)
        # The LLM load signals for the autoscaler, counted here so every engine reports them.
        self.load = LoadTracker()
        log.info("model server %s@%s: starting %s engine", model, version.name, version.engine.kind)
        # A failed start raises here, so Serve reports the deployment unhealthy with the
        # typed error's message instead of serving from a half-loaded engine.
        await self.engine.start()
        log.info("model server %s@%s: ready", model, version.name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Stream the engine's chunks, coalesced into lists (see ``stream_batching``).
        Serve cancels this generator when the caller goes away; that closes the engine's
        iterator, which aborts the generation."""
        batches = batched_chunks(self.engine.generate(request), self.version.stream_batch_interval_ms / 1000)
        gen = self.load.start()
        usage = None
        try:
            async for batch in batches:
                # A chunk with text is at least one token; the final usage tops up the rest.
                self.load.tokens(gen, sum(max(1, len(c.logprobs)) for c in batch if c.text))
                usage = next((c.usage for c in batch if c.usage is not None), usage)
                yield batch
        finally:
            self.load.finish(gen, usage.completion_tokens if usage is not None else None)
            await batches.aclose()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on every replica and hands the figures to the deployment's
        autoscaling policy (``autoscaling.serve_policy``): waiting, running, tokens/s and
        p90 time to first token (``cluster.load_signals``)."""
        return self.load.snapshot()

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def stats(self) -> dict[str, Any]:
        """The engine's own counters (generations completed and aborted, ...), for tests,
        benchmarks and operators; empty for an engine that keeps none."""
        stats = getattr(self.engine, "stats", None)
        if callable(stats):
            return dict(stats())
        if stats is not None and hasattr(stats, "__dict__"):
            return {k: v for k, v in vars(stats).items() if isinstance(v, (int, float, str))}
        return {}

    async def ready(self) -> dict[str, Any]:
        """Health plus placement facts, for /readyz and the GPU-placement test."""
        await self.engine.check_health()
        import ray

        ctx = ray.get_runtime_context()
        return {
            "model": self.model,
            "version": self.version.name,
            "engine": self.version.engine.kind,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "num_gpus": self.version.resources.num_gpus,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
        }

    async def __del__(self) -> None:
        await self.engine.shutdown()
