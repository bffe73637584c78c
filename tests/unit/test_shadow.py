"""Shadow traffic from the gateway's side, over in-process fake engines: drawn by share,
bounded, answers dropped, figures recorded under the shadow version."""

from __future__ import annotations

import asyncio
import random
import time

from cluster.loader import config_from_dict
from cluster.traffic_store import MemoryTrafficStore, TrafficSnapshot
from cluster.types import ChatMessage, GenerationRequest, RouteDecision, SamplingParams
from deployments.engines.fake import FakeEngine
from deployments.gateway.ensemble import Ensemble, with_id
from deployments.gateway.figures import FigureRecorder
from deployments.gateway.shadow import ShadowSender

CFG = config_from_dict(
    {"models": [{"name": "code", "role": "specialist", "domains": ["code"],
                 "versions": [{"name": v, "engine": {"kind": "fake", "default_completion_tokens": 4, "ttft_ms": 50}} for v in ("v1", "v2")]},
                {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}]}
)
FIRST = RouteDecision("code", "v1", "named")
GEN = GenerationRequest("r", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=4))


def snapshot(share: float, version: str = "v2") -> TrafficSnapshot:
    return TrafficSnapshot(1, shadows={"code": {"version": version, "share": share}})


def test_targets_are_drawn_by_share_and_checked() -> None:
    sender = ShadowSender(CFG, ensemble=None, rng=random.Random(3))  # type: ignore[arg-type]
    hits = sum(sender.target(snapshot(0.25), FIRST) is not None for _ in range(4000))
    assert abs(hits / 4000 - 0.25) < 0.03
    assert sender.target(snapshot(1.0, "v9"), FIRST) is None  # not a deployed version
    assert sender.target(snapshot(1.0, "v1"), FIRST) is None  # the request already goes there
    assert sender.target(TrafficSnapshot(1), FIRST) is None
    assert sender.target(snapshot(1.0), RouteDecision("general", "v1", "named")) is None


async def test_shadow_calls_are_bounded_dropped_and_recorded() -> None:
    engines = {}
    for m, v in CFG.deployments():
        engines[f"{m.name}-{v.name}"] = FakeEngine(v.engine)
        await engines[f"{m.name}-{v.name}"].start()
    store = MemoryTrafficStore()
    recorder = FigureRecorder(store, wall=lambda: 500.0)
    ensemble = Ensemble(CFG, lambda d, r: engines[d.deployment_name].generate(r), time.monotonic, recorder)
    sender = ShadowSender(CFG, ensemble, max_concurrent=2)
    target = RouteDecision("code", "v2", "shadow")
    results = [sender.send(target, lambda d: with_id(GEN, d, logprobs=True)) for _ in range(5)]
    assert results == [True, True, False, False, False] and sender.skipped == 3
    await asyncio.sleep(0.2)
    assert sender.active == 0 and engines["code-v2"].completed == 2
    await recorder.flush(everything=True)
    got = await store.read_figures("code", "v2", 500, 501)
    assert (got.requests, got.errors, got.gated) == (2, 0, 2)
