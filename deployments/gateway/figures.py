"""Per-version figures of this gateway's model calls, flushed to the traffic store.

Each finished call adds to its version's window for the current wall-clock second (the
call's own latency and time to first token, and whether it failed); each gate verdict adds
to the gated version's counts. A background task adds the finished seconds into the store
once a second, where a rollout's analysis reads them merged over all gateways. When the
store is away, seconds are kept up to ``keep_s`` and sent when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from cluster.errors import SLMError
from cluster.figures import Window
from cluster.protocols import TrafficStore
from cluster.traffic_store import FiguresMaybeWritten
from deployments.gateway.calls import Call

log = logging.getLogger("ray.serve")


class FigureRecorder:
    def __init__(self, store: TrafficStore | None, *, wall: Callable[[], float] = time.time, flush_s: float = 1.0,
                 keep_s: float = 120.0) -> None:
        self.store = store
        self.wall = wall
        self.flush_s = flush_s
        self.keep_s = keep_s
        self.pending: dict[tuple[str, str, int], Window] = {}
        self.dropped = 0
        self._task: asyncio.Task | None = None

    def _window(self, call: Call) -> Window:
        key = (call.decision.model, call.decision.version, int(self.wall()))
        return self.pending.setdefault(key, Window())

    def call_done(self, call: Call) -> None:
        if self.store is None or call.cancelled:
            return  # a cancelled call says nothing about its version's health
        ok = call.final is not None
        latency = (call.ended_at - call.started_at) if ok and call.ended_at is not None else None
        ttft = (call.first_at - call.started_at) if call.first_at is not None else None
        self._window(call).record(ok=ok, latency_s=latency, ttft_s=ttft, gate_passed=None)

    def gated(self, call: Call, passed: bool) -> None:
        if self.store is not None:
            self._window(call).record_gate(passed)

    def ensure_started(self) -> None:
        if self.store is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def flush(self, *, everything: bool = False) -> None:
        assert self.store is not None
        now = int(self.wall())
        ready = [k for k in self.pending if everything or k[2] < now]  # finished seconds only
        if not ready:
            return
        entries = [(m, v, s, self.pending.pop((m, v, s))) for m, v, s in ready]
        try:
            await self.store.add_figures(entries)
        except FiguresMaybeWritten:
            # Sent, maybe applied: a retry could count these seconds twice, so they are
            # dropped (figures are for analysis; a lost second is better than a doubled one).
            self.dropped += len(entries)
            log.warning("gateway: a figures write timed out after it was sent; %d entries not retried", len(entries))
        except SLMError:
            for m, v, s, w in entries:  # keep them for the next try, within keep_s
                if now - s <= self.keep_s:
                    self.pending.setdefault((m, v, s), Window()).add(w)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - figures must never take the gateway down
                log.exception("gateway: flushing figures failed")
