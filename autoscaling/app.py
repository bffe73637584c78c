"""The control plane's own Serve application: the rollout controller.

``build_controller(args)`` is the import path (``autoscaling.app:build_controller``) that
the serve config names beside the data plane's ``deployments.app:build_app``; ``args``
carries the cluster config inline, as for the data plane. One replica ticks the
controller every ``tick_s``; a replica that dies is replaced by Serve, and the rollouts
live in Redis, so a new replica carries on where the old one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application

from autoscaling.controller import RolloutController
from cluster.config import ClusterConfig
from cluster.errors import ConfigError, SLMError
from cluster.loader import resolve_config
from cluster.serve_config import CONTROLLER_APP
from cluster.traffic_store import RedisTrafficStore

__all__ = ["CONTROLLER_APP", "ControllerDeployment", "build_controller"]

log = logging.getLogger("ray.serve")


class ControllerDeployment:
    async def __init__(self, config: ClusterConfig, tick_s: float = 1.0) -> None:
        url = config.redis.resolved_url(os.environ)
        if url is None:
            raise ConfigError("the rollout controller needs a Redis", issues=(("redis.url", "unset: `slmctl up` sets the embedded one"),))
        r = config.redis
        self.controller = RolloutController(RedisTrafficStore(url, prefix=r.key_prefix, password=r.password(os.environ), timeout_s=r.timeout_s))
        self.tick_s = tick_s
        self.ticks = 0
        self.last_error: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.controller.tick()
                self.ticks += 1
                self.last_error = None
            except SLMError as err:  # Redis away: try again next tick
                self.last_error = err.message
            except Exception as exc:  # noqa: BLE001 - keep ticking; status shows it
                log.exception("rollout controller: tick failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(self.tick_s)

    async def status(self) -> dict[str, Any]:
        return {"ticks": self.ticks, "last_error": self.last_error, "refused": list(self.controller.errors)}

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("the controller loop stopped")


def build_controller(args: dict[str, Any] | None = None) -> Application:
    args = dict(args or {})
    cfg = resolve_config(profile=args.get("profile"), path=args.get("config_path"), inline=args.get("config"))
    return (
        serve.deployment(ControllerDeployment)
        .options(name="rollout-controller", num_replicas=1, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=8,
                 health_check_period_s=10)
        .bind(cfg, float(args.get("tick_s", 1.0)))
    )
