"""Model versions that run inside the gateway (``runs_in: gateway``).

A ``remote_openai`` engine is an HTTP client: it holds no weights, and a ModelServer
deployment of its own costs every call one more Serve hop, a streaming handle call that
takes about 4 ms of CPU at each end on the 2-core benchmark machine (docs/benchmarks.md,
"Front door"). Inside the gateway the call is a task of the gateway's own event loop.

Such a version gives up replicas, autoscaling and Serve health checks of its own (it
scales with the gateway, and an upstream outage is not something a restart fixes; see
``RemoteOpenAIEngine.check_health``). Its ``max_ongoing_requests`` and
``max_queued_requests`` bound its calls per gateway replica, as Serve bounds a
deployment's per caller. Everything else about a call (deadlines, cancellation that
aborts the upstream request, retries, the breaker, figures, audit) is the same.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

from cluster.config import ClusterConfig, ModelVersionConfig
from cluster.errors import EngineUnavailableError
from cluster.types import GenerationChunk, GenerationRequest, deployment_name
from deployments.engines import create_engine
from deployments.model_server import prepare_request
from deployments.stream_batching import DirectStream


class InGatewayModel:
    """One version's engine in the gateway's process, started on its first call."""

    def __init__(self, model: str, version: ModelVersionConfig) -> None:
        self.model = model
        self.version = version
        self.engine = create_engine(version.engine, system_prompt=version.system_prompt)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(version.max_ongoing_requests)
        self._waiting = 0

    def stream(self, request: GenerationRequest) -> DirectStream:
        """The call's chunks, pulled as a ModelServer's are (``streams.timed_chunks``)."""
        return DirectStream(self._generate(request))

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        limit = self.version.max_queued_requests
        if self._slots.locked() and limit != -1 and self._waiting >= limit:
            raise EngineUnavailableError(f"{self.model}@{self.version.name} is at capacity; retry shortly.", code="model_at_capacity")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            await self._start()
            request = prepare_request(request, self.engine, self.version)
            # aclosing: a cancelled call closes the engine's stream now, which aborts the
            # upstream request, rather than whenever the generator is collected.
            async with aclosing(self.engine.generate(request)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    yield chunk
        finally:
            self._slots.release()

    async def _start(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.engine.start()  # a bad URL or a missing key: a typed error for this call
                self._started = True

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def in_gateway_models(cfg: ClusterConfig) -> dict[str, InGatewayModel]:
    """The versions that run in the gateway, by deployment name (``code-v1``)."""
    return {
        deployment_name(m.name, v.name): InGatewayModel(m.name, v)
        for m, v in cfg.deployments()
        if v.runs_in == "gateway"
    }
