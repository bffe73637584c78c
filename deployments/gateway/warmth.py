"""Which model deployments have no running replica, learnt off the request path, and the
warm-up calls that bring a scaled-to-zero specialist back.

Only deployments that may scale to zero (``min_replicas: 0``) are watched; with none, no
poller runs. A poller asks Serve's controller for the replica counts every ``poll_s``;
requests read the last answer from memory (``cold``). Until the first answer, a
deployment deployed with no replica counts as cold, so the first requests after a deploy
do not wait for it.

A warm-up is one ``ready()`` call through the deployment's handle: it queues at the
handle, which pushes its queue to the controller at once when the deployment has no
replica, and Serve's autoscaler scales from zero on that. One warm-up per deployment is in
flight at a time; each is a tracked task with a deadline, cancelled on close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Mapping

from deployments.gateway.streams import within

log = logging.getLogger("ray.serve")

ReplicaCounts = Callable[[], Awaitable[Mapping[str, int]]]


class Warmth:
    def __init__(
        self,
        watched: Mapping[str, bool],
        handles: Mapping[str, Any],
        counts: ReplicaCounts,
        *,
        poll_s: float = 1.0,
        warm_up_timeout_s: float = 600.0,
    ) -> None:
        """``watched``: deployment name -> starts cold (deployed with no replica)."""
        self.watched = dict(watched)
        self.handles = handles
        self.counts = counts
        self.poll_s = poll_s
        self.warm_up_timeout_s = warm_up_timeout_s
        self.cold: frozenset[str] = frozenset(n for n, starts_cold in self.watched.items() if starts_cold)
        self.healthy = True
        self.warm_ups = 0
        self._poller: asyncio.Task | None = None
        self._warming: dict[str, asyncio.Task] = {}
        self._warmed_at: dict[str, float] = {}

    def ensure_started(self) -> None:
        """Start the poller on the serving event loop (the first request calls this)."""
        if self.watched and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def refresh(self) -> None:
        started = self._now()
        try:
            counts = await self.counts()
        except Exception as exc:  # noqa: BLE001 - keep the last view; the next poll may work
            if self.healthy:
                log.warning("gateway: cannot read replica counts (%s); keeping the last view", type(exc).__name__)
            self.healthy = False
            return
        self.healthy = True
        # A deployment being warmed up right now stays cold in our eyes until Serve counts
        # a running replica, so requests keep going to the general model meanwhile. A read
        # that began before a warm-up answered is older than what that answer told us, so
        # it may not make the warmed deployment cold again.
        fresh = {name for name, at in self._warmed_at.items() if at > started}
        self.cold = frozenset(name for name in self.watched if counts.get(name, 0) == 0 and name not in fresh)

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.poll_s)

    def warm_up(self, name: str) -> bool:
        """Fire a warm-up for ``name`` unless one is in flight; True when one was started."""
        if name not in self.handles or name in self._warming:
            return False
        self.warm_ups += 1
        task = asyncio.get_running_loop().create_task(self._warm(name), name=f"warm-up-{name}")
        self._warming[name] = task
        return True

    async def _warm(self, name: str) -> None:
        try:
            await within(self.handles[name].ready.remote(), self.warm_up_timeout_s)
            # The replica answered, so it runs: serve it without waiting for the next poll.
            self._warmed_at[name] = self._now()
            self.cold = self.cold - {name}
            log.info("gateway: %s is warm", name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed warm-up is retried by the next cold request
            log.warning("gateway: warm-up of %s failed (%s)", name, type(exc).__name__)
        finally:
            self._warming.pop(name, None)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def status(self) -> dict[str, Any]:
        return {"watched": sorted(self.watched), "cold": sorted(self.cold), "warming": sorted(self._warming),
                "warm_ups": self.warm_ups, "healthy": self.healthy}

    async def close(self) -> None:
        tasks = [t for t in (self._poller, *self._warming.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def serve_replica_counts(app_name: str) -> ReplicaCounts:
    """Running replicas per deployment of ``app_name``, from Serve's controller. The call
    blocks, so it runs in a worker thread, never on the serving loop."""

    def read() -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(app_name)
        if app is None:
            return {}
        return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}

    async def counts() -> Mapping[str, int]:
        return await asyncio.to_thread(read)

    return counts
