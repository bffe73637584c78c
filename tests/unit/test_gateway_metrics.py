"""What the gateway records per request (without Ray: the metric objects are recorders),
and that a failing metric never fails a request."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest

from cluster import metric_names as mn
from cluster.traffic_store import TrafficSnapshot
from deployments.gateway import metrics
from tests.unit.test_ensemble import Harness, fakes, make_config


class Recorder:
    def __init__(self, spec: mn.MetricSpec, log: dict) -> None:
        self.spec, self.log = spec, log

    def _record(self, value: float, tags: dict[str, str] | None) -> None:
        assert set(tags or {}) == set(self.spec.labels), (self.spec.name, tags)
        self.log[self.spec.name].append((dict(tags or {}), value))

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert value > 0
        self._record(value, tags)

    observe = set = _record


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[dict[str, str], float]]]:
    log: dict[str, list] = defaultdict(list)
    monkeypatch.setattr(metrics, "make", lambda spec: Recorder(spec, log))
    return log


def _sum(log: dict, spec: mn.MetricSpec, **match: str) -> float:
    return sum(v for tags, v in log[spec.name] if all(tags.get(k) == x for k, x in match.items()))


async def test_a_race_and_a_cascade_are_recorded_from_the_outcome(recorded: dict[str, Any]) -> None:
    cfg = make_config()
    h = Harness(cfg, await fakes(cfg))
    gm = metrics.GatewayMetrics(cfg)
    for strat, version in (("race", "sure"), ("cascade", "unsure")):
        started = time.monotonic()
        out, _ = await h.run(strat, version)
        gm.request_done(started_at=started, status=200, strategy=strat, decision=out.winner.decision,
                        first=out.calls[0].decision, out=out, snapshot=TrafficSnapshot(1))
    await gm.close()  # counters are summed and handed to Ray by a flusher: the last sums now
    assert _sum(recorded, mn.REQUESTS, status_class="2xx") == 2
    assert _sum(recorded, mn.RACE_WINS, model="code", winner="small") == 1
    assert _sum(recorded, mn.ESCALATIONS, model="code", strategy="cascade", escalated="true") == 1
    assert _sum(recorded, mn.CANCELLED_CALLS, model="frontier", strategy="race") == 1
    assert len(recorded[mn.GATE_SCORE.name]) == 2 and len(recorded[mn.TTFT.name]) == 2
    assert _sum(recorded, mn.TOKENS, model="code", direction="output") > 0
    assert {(t["model"], t["version"]) for t, _ in recorded[mn.TRAFFIC_WEIGHT.name]} == {
        (m.name, v.name) for m, v in cfg.deployments()
    }
    assert gm.errors == 0


async def test_counters_are_summed_between_flushes_and_flushed_in_the_background(recorded: dict[str, Any],
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "FLUSH_S", 0.05)
    gm = metrics.GatewayMetrics(make_config())
    for _ in range(3):
        gm.request_done(started_at=time.monotonic(), status=400, strategy=None)
    assert recorded[mn.REQUESTS.name] == [] and len(recorded[mn.REQUEST_DURATION.name]) == 3  # histograms at once
    await asyncio.sleep(0.2)
    assert [v for _, v in recorded[mn.REQUESTS.name]] == [3.0]  # one record of the sum
    gm.request_done(started_at=time.monotonic(), status=400, strategy=None)
    await gm.close()
    assert [v for _, v in recorded[mn.REQUESTS.name]] == [3.0, 1.0]


def test_an_error_before_any_model_is_counted_with_none_labels(recorded: dict[str, Any]) -> None:
    gm = metrics.GatewayMetrics(make_config())
    gm.request_done(started_at=time.monotonic(), status=400, strategy=None)
    assert recorded[mn.REQUESTS.name] == [
        ({"model": "none", "version": "none", "strategy": "none", "route_reason": "none", "status_class": "4xx"}, 1)
    ]


def test_a_failing_metric_never_fails_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("metrics agent gone")

    monkeypatch.setattr(metrics, "make", lambda spec: Broken())
    gm = metrics.GatewayMetrics(make_config())
    gm.request_done(started_at=time.monotonic(), status=200, strategy="route")
    gm.request_done(started_at=time.monotonic(), status=500, strategy="route")
    assert gm.errors == 4  # per request: its histogram record, and the flush of its counters (no event loop: at once)

    def no_ray(spec: mn.MetricSpec) -> Any:
        raise RuntimeError("no Ray here")

    monkeypatch.setattr(metrics, "make", no_ray)
    gm = metrics.GatewayMetrics(make_config())  # building fails: counted, requests go on
    gm.request_done(started_at=time.monotonic(), status=200, strategy="route")
    assert gm.errors == 1
