"""Per-version figures: histogram quantiles, merging, and the gateway's recorder."""

from __future__ import annotations

import pytest

from cluster import figures as f
from cluster.errors import EngineUnavailableError
from cluster.traffic_store import MemoryTrafficStore


@pytest.mark.parametrize(("values", "q", "low", "high"), [([0.5] * 100, 0.95, 0.5, 0.56), ([0.1 * i for i in range(1, 101)], 0.95, 9.5, 10.7),
                                                          ([0.001], 0.5, 0.0, 0.01), ([500.0], 0.5, float("inf"), float("inf"))])
def test_quantiles_are_bucket_upper_bounds_within_12_percent(values, q, low, high) -> None:
    w = f.Window()
    for v in values:
        w.record(ok=True, latency_s=v, ttft_s=None, gate_passed=None)
    got = f.quantile(w.latency, q)
    assert low <= got <= high


def test_merge_and_fields_round_trip() -> None:
    a, b = f.Window(), f.Window()
    a.record(ok=True, latency_s=0.2, ttft_s=0.05, gate_passed=True)
    b.record(ok=False, latency_s=None, ttft_s=None, gate_passed=None)
    b.record_gate(False)
    merged = f.Window.merged([a, b])
    assert (merged.requests, merged.errors, merged.gated, merged.escalated) == (2, 1, 2, 1)
    assert f.Window.from_fields(merged.to_fields()) == merged
    assert f.quantile({}, 0.95) is None and f.Window().p95_latency_s() is None


class Flaky(MemoryTrafficStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def add_figures(self, entries):  # type: ignore[no-untyped-def]
        if self.down:
            raise EngineUnavailableError("redis down")
        await super().add_figures(entries)


async def test_the_recorder_flushes_finished_seconds_and_keeps_them_while_the_store_is_away() -> None:
    from cluster.types import RouteDecision
    from deployments.gateway.figures import FigureRecorder

    class FakeCall:
        def __init__(self, version: str, ok: bool, cancelled: bool = False) -> None:
            self.decision = RouteDecision("code", version, "named")
            self.final = object() if ok else None
            self.cancelled = cancelled
            self.started_at, self.first_at, self.ended_at = 0.0, 0.1, 0.5

    now = [100.0]
    store = Flaky()
    rec = FigureRecorder(store, wall=lambda: now[0])
    rec.call_done(FakeCall("v2", ok=True))
    rec.call_done(FakeCall("v2", ok=False))
    rec.call_done(FakeCall("v2", ok=True, cancelled=True))  # a lost race says nothing about v2
    rec.gated(FakeCall("v2", ok=True), passed=False)
    await rec.flush()  # second 100 is not finished yet
    assert (await store.read_figures("code", "v2", 100, 101)).requests == 0
    now[0] = 101.0
    store.down = True
    await rec.flush()  # kept for later
    store.down = False
    await rec.flush()
    got = await store.read_figures("code", "v2", 100, 101)
    assert (got.requests, got.errors, got.gated, got.escalated) == (2, 1, 1, 1)
    assert got.p95_latency_s() is not None and got.p95_ttft_s() is not None


async def test_a_write_that_timed_out_after_sending_is_not_retried() -> None:
    """HINCRBY is not idempotent: resending a write Redis may have applied would count those
    seconds twice (a canary's analysis would see requests that never happened)."""
    from cluster.traffic_store import FiguresMaybeWritten
    from cluster.types import RouteDecision
    from deployments.gateway.figures import FigureRecorder

    class Applied(MemoryTrafficStore):
        def __init__(self) -> None:
            super().__init__()
            self.writes = 0

        async def add_figures(self, entries):  # type: ignore[no-untyped-def]
            self.writes += 1
            await super().add_figures(entries)  # applied...
            if self.writes == 1:
                raise FiguresMaybeWritten("timed out reading the reply")  # ...but the reply was lost

    class FakeCall:
        decision = RouteDecision("code", "v3", "named")
        final, cancelled = object(), False
        started_at, first_at, ended_at = 0.0, 0.1, 0.5

    now = [100.0]
    store = Applied()
    rec = FigureRecorder(store, wall=lambda: now[0])
    for _ in range(6):
        rec.call_done(FakeCall())
    now[0] = 101.0
    await rec.flush()
    await rec.flush()
    assert (await store.read_figures("code", "v3", 100, 101)).requests == 6  # not 12
    assert rec.dropped == 1 and rec.pending == {}
