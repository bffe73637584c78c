"""The gateway's copy of the traffic splits, refreshed from the store in the background.

Requests read the last snapshot from memory; only the poller talks to the store. When the
store goes away the gateway serves on with the last snapshot it got and says so
(``healthy`` false, ``error``); when the store comes back, changes flow again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from cluster.errors import SLMError
from cluster.protocols import TrafficStore
from cluster.traffic_store import TrafficSnapshot

log = logging.getLogger("ray.serve")


class SplitCache:
    def __init__(self, store: TrafficStore | None, poll_s: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.poll_s = poll_s
        self.clock = clock
        self.snapshot = TrafficSnapshot(0)
        self.healthy = store is None
        self.error: str | None = None
        self.last_ok: float | None = None
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        """Start the poller on the serving event loop (the replica's constructor may run
        before that loop exists, so the first request starts it)."""
        if self.store is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def refresh(self) -> None:
        assert self.store is not None
        try:
            snap = await self.store.snapshot()
        except SLMError as err:
            if self.healthy or self.error != err.message:
                log.warning("gateway: traffic store unreachable (%s); serving with the last split", err.message)
            self.healthy, self.error = False, err.message
            return
        if not self.healthy and self.error is not None:
            log.info("gateway: traffic store reachable again")
        self.snapshot, self.healthy, self.error, self.last_ok = snap, True, None, self.clock()

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.poll_s)

    def status(self) -> dict[str, object]:
        return {
            "store": "none" if self.store is None else type(self.store).__name__,
            "healthy": self.healthy,
            "error": self.error,
            "revision": self.snapshot.revision,
            "splits": self.snapshot.splits,
            "current": self.snapshot.current,
            "shadows": self.snapshot.shadows,
            "age_s": None if self.last_ok is None else round(self.clock() - self.last_ok, 3),
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.store is not None:
            await self.store.close()
