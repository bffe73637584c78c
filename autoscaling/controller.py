"""The rollout controller: the one writer of rollouts and their traffic splits.

Each ``tick``: apply the operators' queued commands (start, pause, resume, promote,
abort), analyse every progressing rollout whose step interval is over (from the
per-version figures the gateways recorded in the store), and write the weights each
rollout's state implies. A promoted candidate also becomes the model's current version in
the store, so it stays current across gateway restarts. The decisions are the pure state
machine in ``autoscaling.rollout``; this module only reads and writes the store.

It runs inside the cluster as its own Serve application (``autoscaling.app``), so it is
the same under ``slmctl up`` and in a RayService.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from autoscaling import rollout as ro
from cluster.errors import SLMError
from cluster.figures import Window
from cluster.protocols import TrafficStore

log = logging.getLogger("ray.serve")

OPS = ("start", "pause", "resume", "promote", "abort")


def to_figures(w: Window) -> ro.Figures:
    return ro.Figures(requests=w.requests, errors=w.errors, p95_latency_s=w.p95_latency_s(), p95_ttft_s=w.p95_ttft_s(),
                      gated=w.gated, escalated=w.escalated)


@dataclass
class RolloutController:
    store: TrafficStore
    clock: Callable[[], float] = time.time  # wall clock: gateways bucket figures by unix second
    errors: list[str] = field(default_factory=list)  # the latest refused commands, for status

    async def tick(self) -> dict[str, ro.Rollout]:
        now = self.clock()
        rollouts = {m: ro.Rollout.from_dict(d) for m, d in (await self.store.read_rollouts()).items()}
        changed: set[str] = set()
        for command in await self.store.pop_commands():
            try:
                model, r = self._apply(command, rollouts.get(str(command.get("model"))), now)
            except SLMError as err:
                self.errors = [*self.errors, f"{command.get('op')} {command.get('model')}: {err.message}"][-20:]
                log.warning("rollout controller: refused %s: %s", command, err.message)
                continue
            rollouts[model] = r
            changed.add(model)
        for model, r in rollouts.items():
            if r.due(now):
                start, end = int(r.step_started_at), int(now)
                stable = await self.store.read_figures(model, r.spec.stable, start, end)
                candidate = await self.store.read_figures(model, r.spec.candidate, start, end)
                analysis = ro.analyse(r.spec, to_figures(stable), to_figures(candidate), now)
                rollouts[model] = ro.advance(r, analysis)
                changed.add(model)
                log.info("rollout controller: %s: %s", model, rollouts[model].history[-1])
        snap = await self.store.snapshot()
        for model, r in rollouts.items():  # shadow traffic only while a rollout's shadow phase runs
            want = r.shadowing
            have = snap.shadows.get(model)
            if want and have != {"version": r.spec.candidate, "share": r.spec.shadow_share}:
                await self.store.set_shadow(model, r.spec.candidate, r.spec.shadow_share)
            elif not want and have is not None and have.get("version") == r.spec.candidate:
                await self.store.clear_shadow(model)
        for model in changed:
            r = rollouts[model]
            await self.store.write_rollout(model, r.to_dict())
            if snap.splits.get(model) != r.weights:
                await self.store.write_split(model, r.weights)
            if r.state == ro.PROMOTED and snap.current.get(model) != r.spec.candidate:
                await self.store.set_current(model, r.spec.candidate)
        return rollouts

    def _apply(self, command: dict[str, Any], current: ro.Rollout | None, now: float) -> tuple[str, ro.Rollout]:
        op, model = command.get("op"), str(command.get("model"))
        if op not in OPS:
            raise ro.RolloutError(f"unknown command {op!r}")
        if op == "start":
            if current is not None and not current.finished:
                raise ro.RolloutError(f"{model} already has a rollout ({current.spec.stable} -> {current.spec.candidate}, {current.state})")
            spec = dict(command["spec"])
            spec["steps"] = tuple(spec.get("steps", ro.RolloutSpec.steps))
            return model, ro.start(ro.RolloutSpec(**spec), now)
        if current is None:
            raise ro.RolloutError(f"{model} has no rollout")
        step = {"pause": ro.pause, "resume": ro.resume, "promote": ro.promote, "abort": ro.abort}[op]
        return model, step(current, now)
