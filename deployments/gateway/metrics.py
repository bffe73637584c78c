"""Prometheus metrics through ``ray.serve.metrics``: Ray's metrics agent exports them beside
its own ``ray_serve_*`` (names, labels and buckets: ``cluster/metric_names.py``).

The gateway records one request at its end (a streamed one when its stream ends), from the
figures it already has for its headers: the ``Outcome`` and the cost of every call. A
metrics error is logged once and counted, never raised into a request.

Counter increments are summed in memory and handed to Ray every ``FLUSH_S`` by a
background task (a Ray metric record costs tens of microseconds, and a request makes up
to ten): Prometheus scrapes counters as running totals, so nothing is lost but up to
half a second of freshness. Histograms and gauges are recorded at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Callable

from cluster import metric_names as mn
from cluster.config import ClusterConfig
from cluster.strategy import NOT_ESCALATED
from cluster.traffic_store import TrafficSnapshot
from cluster.types import RouteDecision
from deployments.gateway.ensemble import Outcome

log = logging.getLogger("ray.serve")

FLUSH_S = 0.5


def make(spec: mn.MetricSpec) -> Any:
    from ray.serve import metrics

    if spec.kind == mn.COUNTER:
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.labels)
    if spec.kind == mn.HISTOGRAM:
        return metrics.Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels)
    return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.labels)


class _Guarded:
    """Swallows (and counts) metric errors: a metric must never fail a request."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.errors = 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        self.errors += 1
        if self.errors == 1:
            log.warning("%s metrics failed (%s: %s); further failures are counted only", self.what, type(exc).__name__, exc)
        return True


class GatewayMetrics:
    def __init__(self, cfg: ClusterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.guard = _Guarded("gateway")
        self.m: dict[str, Any] = {}
        with self.guard:
            self.m = {spec.name: make(spec) for spec in mn.GATEWAY_METRICS}
        self._revision: int | None = None
        self._versions = {m.name: (m.current.name, [v.name for v in m.versions]) for m in cfg.models}
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._flusher: asyncio.Task | None = None

    @property
    def errors(self) -> int:
        return self.guard.errors

    def _inc(self, spec: mn.MetricSpec, value: float, **tags: str) -> None:
        if value > 0:  # Ray's counters refuse 0
            key = (spec.name, tuple(tags.items()))
            self._pending[key] = self._pending.get(key, 0.0) + value

    def flush(self) -> None:
        """Hand the summed counter increments to Ray."""
        pending, self._pending = self._pending, {}
        with self.guard:
            for (name, tags), value in pending.items():
                self.m[name].inc(value, tags=dict(tags))

    def _flush_soon(self) -> None:
        """Start the flusher on the first request; without an event loop (a plain call in a
        script or test), flush at once."""
        if self._flusher is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flusher = loop.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.flush()

    async def close(self) -> None:
        """Stop the flusher and hand over what it holds (the replica is stopping)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self.flush()

    def _observe(self, spec: mn.MetricSpec, value: float, **tags: str) -> None:
        self.m[spec.name].observe(value, tags=tags)

    def request_done(
        self,
        *,
        started_at: float,
        status: int,
        strategy: str | None,
        decision: RouteDecision | None = None,
        first: RouteDecision | None = None,
        out: Outcome | None = None,
        first_token_at: float | None = None,
        snapshot: TrafficSnapshot | None = None,
    ) -> None:
        """Record one request. ``first_token_at``: when the client could have its first token
        (streamed answers); otherwise the answering call's first token at the gateway."""
        with self.guard:
            self._request_done(started_at, status, strategy, decision, first, out, first_token_at, snapshot)
        self._flush_soon()

    def _request_done(
        self,
        started_at: float,
        status: int,
        strategy: str | None,
        decision: RouteDecision | None,
        first: RouteDecision | None,
        out: Outcome | None,
        first_token_at: float | None,
        snapshot: TrafficSnapshot | None,
    ) -> None:
        if not self.m:
            return
        now = self.clock()
        strat = (out.strategy if out is not None else strategy) or mn.NONE
        model = decision.model if decision is not None else mn.NONE
        version = decision.version if decision is not None else mn.NONE
        reason = decision.reason if decision is not None else mn.NONE
        who = {"model": model, "version": version, "strategy": strat}
        self._inc(mn.REQUESTS, 1, **who, route_reason=reason, status_class=mn.status_class(status))
        self._observe(mn.REQUEST_DURATION, now - started_at, **who)
        if snapshot is not None and snapshot.revision != self._revision:
            self.set_weights(snapshot)
        if out is None:
            return
        small = (first or decision or out.winner.decision).model
        winner = out.winner
        first_at = first_token_at if first_token_at is not None else winner.first_at
        if first_at is not None:
            self._observe(mn.TTFT, first_at - started_at, **who)
        if winner.first_at is not None and winner.ended_at is not None and winner.tokens > 1:
            self._observe(mn.INTER_TOKEN, (winner.ended_at - winner.first_at) / (winner.tokens - 1), model=model, version=version)
        bill = out.bill(self.cfg)
        for rec, spent in zip(bill.records, bill.costs):
            tags = {"model": rec.model, "version": rec.version}
            self._inc(mn.TOKENS, rec.prompt_tokens, **tags, direction="input")
            self._inc(mn.TOKENS, rec.completion_tokens, **tags, direction="output")
            self._inc(mn.COST, spent.usd, **tags)
            self._inc(mn.ENERGY, spent.joules, **tags)
        if bill.alone is not None:  # the x-slm-frontier-cost-usd figure
            self._inc(mn.FRONTIER_COUNTERFACTUAL, bill.alone.usd, strategy=strat)
        if out.escalated != NOT_ESCALATED:
            self._inc(mn.ESCALATIONS, 1, model=small, strategy=strat, escalated=out.escalated)
        if out.race_winner is not None:
            self._inc(mn.RACE_WINS, 1, model=small, winner=out.race_winner)
        for call in out.calls:
            if call.cancelled:
                self._inc(mn.CANCELLED_CALLS, 1, model=call.decision.model, version=call.decision.version, strategy=strat)
            self._inc(mn.RETRIED_CALLS, call.retries, model=call.decision.model, version=call.decision.version)
        if out.gate_score is not None:
            self._observe(mn.GATE_SCORE, out.gate_score, model=small, strategy=strat)

    def set_weights(self, snapshot: TrafficSnapshot) -> None:
        """The split snapshot as ``slm_traffic_weight`` (set when its revision changes)."""
        with self.guard:
            gauge = self.m[mn.TRAFFIC_WEIGHT.name]
            for (model, version), share in mn.version_weights(self._versions, snapshot.splits, snapshot.current).items():
                gauge.set(share, tags={"model": model, "version": version})
            self._revision = snapshot.revision


async def finish_after(events: AsyncIterator[str], done: Callable[[], None]) -> AsyncIterator[str]:
    """``events``, then ``done()`` when the stream ends (finished, failed or abandoned by the
    client). The inner stream is closed first, so its own cleanup (cancelling the model
    call) runs at once, as it would unwrapped."""
    try:
        async for event in events:
            yield event
    finally:
        try:
            await events.aclose()  # type: ignore[attr-defined]
        finally:
            done()


class RouterMetrics:
    """The router's batch latency and size (one sample per model call of a Serve batch)."""

    def __init__(self) -> None:
        self.guard = _Guarded("router")
        self.m: dict[str, Any] = {}
        with self.guard:
            self.m = {spec.name: make(spec) for spec in mn.ROUTER_METRICS}

    def batch_done(self, size: int, seconds: float) -> None:
        with self.guard:
            if self.m:
                self.m[mn.ROUTER_LATENCY.name].observe(seconds)
                self.m[mn.ROUTER_BATCH_SIZE.name].observe(size)
