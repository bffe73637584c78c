"""ModelServer: one Ray Serve deployment per model version (e.g. ``code-v1``).

Its GPU fraction, autoscaling and ``max_ongoing_requests`` come from the version's config
(see ``deployments.app``); ``check_health`` is wired to the engine so Serve replaces a
replica whose engine died, and fails while a generation is stalled mid-stream
(``StallWatch``), so a wedged engine is replaced too.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, AsyncIterator, Callable

from cluster.config import ModelVersionConfig
from cluster.errors import EngineUnavailableError, InvalidRequestError
from cluster.load_signals import LoadTracker
from cluster.openai_endpoints import apply_defaults
from cluster.protocols import Engine
from cluster.types import GenerationChunk, GenerationRequest
from deployments.engines import create_engine
from deployments.stream_batching import batched_chunks

log = logging.getLogger("ray.serve")


def prepare_request(request: GenerationRequest, engine: Engine, version: ModelVersionConfig) -> GenerationRequest:
    """The request as this version's engine takes it: a raw prompt only where the engine
    takes one (the gateway checks first; defence in depth), and the version's sampling
    defaults in the fields the client left out. Shared with ``deployments.in_gateway``."""
    if request.prompt is not None and not engine.capabilities.raw_prompt:
        raise InvalidRequestError(f"the {version.engine.kind} engine does not take raw prompts (/v1/completions)", param="model")
    return apply_defaults(request, version.defaults)


class StallWatch:
    """When each generation in flight last made progress, counted from its first chunk: a
    wait for the first token is a queue (the gateway's first-token deadline bounds it), a
    gap after tokens is a stall. A generation leaves when its engine iterator has closed, so
    an engine that cannot even abort stays stalled here."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: dict[int, float] = {}
        self._next = 0

    def start(self) -> int:
        self._next += 1
        return self._next

    def progress(self, key: int) -> None:
        self.last[key] = self.clock()

    def with_caller(self, key: int) -> None:
        """The chunks are the caller's to take: no stall of the engine's until they are."""
        self.last[key] = float("inf")

    def done(self, key: int) -> None:
        self.last.pop(key, None)

    def stalled(self, limit_s: float) -> int:
        """Generations with no progress for longer than ``limit_s``."""
        now = self.clock()
        return sum(now - at > limit_s for at in self.last.values())


class ModelServer:
    async def __init__(self, model: str, version: ModelVersionConfig) -> None:
        self.model = model
        self.version = version
        self.engine = create_engine(version.engine, system_prompt=version.system_prompt)
        # The LLM load signals for the autoscaler, counted here so every engine reports them.
        self.load = LoadTracker()
        self.stalls = StallWatch()
        log.info("model server %s@%s: starting %s engine", model, version.name, version.engine.kind)
        # A failed start raises here, so Serve reports the deployment unhealthy with the
        # typed error's message instead of serving from a half-loaded engine.
        await self.engine.start()
        log.info("model server %s@%s: ready", model, version.name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Stream the engine's chunks, coalesced into lists (see ``stream_batching``).
        Serve cancels this generator when the caller goes away; that closes the engine's
        iterator, which aborts the generation."""
        request = prepare_request(request, self.engine, self.version)
        batches = batched_chunks(self.engine.generate(request), self.version.stream_batch_interval_ms / 1000)
        gen = self.load.start()
        watched = self.stalls.start()
        usage = None
        try:
            async for batch in batches:
                # A chunk with text is at least one token; the final usage tops up the rest.
                self.load.tokens(gen, sum(max(1, len(c.logprobs)) for c in batch if c.text))
                usage = next((c.usage for c in batch if c.usage is not None), usage)
                self.stalls.with_caller(watched)  # the caller's pace is not the engine's stall
                yield batch
                self.stalls.progress(watched)
        finally:
            self.load.finish(gen, usage.completion_tokens if usage is not None else None)
            try:
                await batches.aclose()
            finally:
                self.stalls.done(watched)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on every replica and hands the figures to the deployment's
        autoscaling policy (``autoscaling.serve_policy``): waiting, running, tokens/s and
        p90 time to first token (``cluster.load_signals``)."""
        return self.load.snapshot()

    async def check_health(self) -> None:
        limit = self.version.stall_unhealthy_s
        stalled = self.stalls.stalled(limit)
        if stalled:
            raise EngineUnavailableError(f"{stalled} generation(s) streamed tokens and then none for over {limit:g} s: the engine is stalled.")
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
