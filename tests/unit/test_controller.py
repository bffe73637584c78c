"""The rollout controller over the in-memory store, with a hand-driven clock and the
per-second figures gateways would write."""

from __future__ import annotations

from dataclasses import asdict

from autoscaling import rollout as ro
from autoscaling.controller import RolloutController
from cluster.figures import Window
from cluster.traffic_store import MemoryTrafficStore

SPEC = ro.RolloutSpec(model="code", stable="v1", candidate="v2", steps=(20, 50, 100), interval_s=10, min_requests=10, failure_limit=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def second(requests: int, errors: int = 0, latency_s: float = 0.2) -> Window:
    w = Window()
    for i in range(requests):
        w.record(ok=i >= errors, latency_s=latency_s, ttft_s=latency_s / 4, gate_passed=None)
    return w


async def traffic(store: MemoryTrafficStore, clock: Clock, seconds: int, *, candidate_errors: float = 0.0) -> None:
    """``seconds`` of steady traffic split by the current weights: 10 requests a second."""
    weights = (await store.snapshot()).splits.get("code", {"v1": 100})
    for _ in range(seconds):
        s = int(clock.now)
        v2 = round(10 * weights.get("v2", 0) / 100)
        await store.add_figures([("code", "v1", s, second(10 - v2)), ("code", "v2", s, second(v2, round(v2 * candidate_errors)))])
        clock.now += 1


async def test_a_healthy_candidate_is_promoted_and_stays_current() -> None:
    store, clock = MemoryTrafficStore(), Clock()
    ctl = RolloutController(store, clock)
    await store.push_command({"op": "start", "model": "code", "spec": asdict(SPEC)})
    await ctl.tick()
    assert (await store.snapshot()).splits["code"] == {"v2": 20, "v1": 80}
    seen = []
    for _ in range(4):
        await traffic(store, clock, 10)
        rollouts = await ctl.tick()
        seen.append((rollouts["code"].state, (await store.snapshot()).splits["code"]["v2"]))
    assert seen[:3] == [("progressing", 50), ("progressing", 100), ("promoted", 100)]
    snap = await store.snapshot()
    assert snap.current == {"code": "v2"} and snap.splits["code"] == {"v2": 100, "v1": 0}
    assert (await store.read_rollouts())["code"]["state"] == "promoted"


async def test_a_failing_candidate_is_rolled_back_after_failure_limit_checks() -> None:
    store, clock = MemoryTrafficStore(), Clock()
    ctl = RolloutController(store, clock)
    await store.push_command({"op": "start", "model": "code", "spec": asdict(SPEC)})
    await ctl.tick()
    await traffic(store, clock, 10, candidate_errors=0.5)
    r = (await ctl.tick())["code"]
    assert r.state == "progressing" and r.failures == 1 and r.weights["v2"] == 20
    await traffic(store, clock, 10, candidate_errors=0.5)
    r = (await ctl.tick())["code"]
    assert r.state == "failed"
    snap = await store.snapshot()
    assert snap.splits["code"] == {"v2": 0, "v1": 100} and snap.current == {}
    assert r.last is not None and r.last.checks[0].name == "error_rate" and not r.last.checks[0].ok


async def test_operator_commands_and_refusals() -> None:
    store, clock = MemoryTrafficStore(), Clock()
    ctl = RolloutController(store, clock)
    await store.push_command({"op": "start", "model": "code", "spec": asdict(SPEC)})
    await store.push_command({"op": "start", "model": "code", "spec": asdict(SPEC)})  # a second one: refused
    await store.push_command({"op": "pause", "model": "math"})  # no rollout: refused
    rollouts = await ctl.tick()
    assert rollouts["code"].state == "progressing"
    assert len(ctl.errors) == 2 and "already has a rollout" in ctl.errors[0] and "has no rollout" in ctl.errors[1]
    await store.push_command({"op": "pause", "model": "code"})
    assert (await ctl.tick())["code"].state == "paused"
    clock.now += 100  # a paused rollout is never analysed
    assert (await ctl.tick())["code"].state == "paused"
    await store.push_command({"op": "abort", "model": "code"})
    assert (await ctl.tick())["code"].state == "rolled_back"
    assert (await store.snapshot()).splits["code"] == {"v2": 0, "v1": 100}
    # a finished rollout may be followed by a new one
    await store.push_command({"op": "start", "model": "code", "spec": asdict(SPEC)})
    assert (await ctl.tick())["code"].state == "progressing"


async def test_too_few_requests_waits() -> None:
    store, clock = MemoryTrafficStore(), Clock()
    ctl = RolloutController(store, clock)
    await store.push_command({"op": "start", "model": "code", "spec": asdict(SPEC)})
    await ctl.tick()
    clock.now += 11  # an interval without traffic
    r = (await ctl.tick())["code"]
    assert r.state == "progressing" and r.step == 0 and r.last.verdict == "wait"


async def test_the_shadow_phase_mirrors_then_stops() -> None:
    from dataclasses import replace

    store, clock = MemoryTrafficStore(), Clock()
    ctl = RolloutController(store, clock)
    spec = replace(SPEC, shadow=True, shadow_share=0.25)
    await store.push_command({"op": "start", "model": "code", "spec": asdict(spec)})
    await ctl.tick()
    snap = await store.snapshot()
    assert snap.shadows == {"code": {"version": "v2", "share": 0.25}} and snap.splits["code"] == {"v2": 0, "v1": 100}
    # the shadow calls' figures judge the phase (the gateways record them under v2)
    for _ in range(10):
        s = int(clock.now)
        await store.add_figures([("code", "v1", s, second(10)), ("code", "v2", s, second(3))])
        clock.now += 1
    r = (await ctl.tick())["code"]
    snap = await store.snapshot()
    assert r.step == 1 and snap.shadows == {} and snap.splits["code"] == {"v2": 20, "v1": 80}
