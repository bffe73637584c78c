"""Shadow traffic: a share of a model's requests also goes to a candidate version whose
answers are dropped.

Fire and forget, with bounded concurrency: a shadow call starts after the user's plan has
run, never delays or changes the user's answer, and is skipped (and counted) when
``max_concurrent`` shadow calls already run on this gateway. Its latency, errors and gate
verdict land in the candidate version's figures, beside the stable version's, which is
what a rollout's shadow phase is judged on.
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

from cluster.config import ClusterConfig
from cluster.traffic_store import TrafficSnapshot
from cluster.types import GenerationRequest, RouteDecision
from deployments.gateway.ensemble import Ensemble


class ShadowSender:
    def __init__(self, cfg: ClusterConfig, ensemble: Ensemble, *, max_concurrent: int = 8, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.ensemble = ensemble
        self.max_concurrent = max_concurrent
        self.rng = rng or random.Random()
        self.active = 0
        self.sent = 0
        self.skipped = 0
        self._tasks: set[asyncio.Task] = set()

    def target(self, snapshot: TrafficSnapshot, first: RouteDecision) -> RouteDecision | None:
        """The shadow call this request should make, if any (drawn by the shadow's share)."""
        entry = snapshot.shadows.get(first.model)
        if not entry:
            return None
        model = self.cfg.model(first.model)
        version = str(entry.get("version"))
        if model is None or model.version(version) is None or version == first.version:
            return None
        if self.rng.random() >= float(entry.get("share", 0.0)):
            return None
        return RouteDecision(first.model, version, "shadow")

    def send(self, decision: RouteDecision, requests: Callable[[RouteDecision], GenerationRequest]) -> bool:
        if self.active >= self.max_concurrent:
            self.skipped += 1
            return False
        self.active += 1
        self.sent += 1
        task = asyncio.get_running_loop().create_task(self._run(decision, requests))
        self._tasks.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, decision: RouteDecision, requests: Callable[[RouteDecision], GenerationRequest]) -> None:
        try:
            call = self.ensemble.open_call(decision, requests)
            await call.wait_tokens(None)
            if call.final is not None:
                call.gate_score(self.cfg)  # the verdict goes to the version's figures
        finally:
            self.active -= 1
