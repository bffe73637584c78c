"""The one wrapper between Ray Serve's autoscaler and the pure decision in
``autoscaling.policy``.

Serve (2.60) names it by dotted path in a deployment's ``autoscaling_config.policy``
(``cluster.config.LLM_POLICY_PATH``); because ``policy_kwargs`` reach only a class's
constructor, the policy is a class, built once per deployment in Serve's controller and
called with an ``AutoscalingContext`` every control-loop tick (0.1 s). It reads:

- ``ctx.total_num_requests`` and ``ctx.total_queued_requests``: Serve's own counts of
  ongoing requests and of requests queued at the callers' handles;
- the replicas' ``record_autoscaling_stats`` figures (``cluster.load_signals``), the
  latest point of each replica's series when Serve has them (the replica already averages
  over its own window), else Serve's look-back mean.

Serve's wrapper around custom policies still applies ``min``/``max`` and its own delays;
``AutoscalingConfig.serve_options`` sets those delays to zero under this policy, so the
delays and hysteresis here are the only ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

from autoscaling.policy import Decision, PolicyParams, PolicyState, Signals, decide
from cluster import load_signals

log = logging.getLogger("ray.serve")

_STATE_KEYS = {"up_since": "slm_up_since", "down_since": "slm_down_since"}


def _latest(series: Any) -> float | None:
    """The newest value of a Serve time series (a list of TimeStampedValue), if any."""
    try:
        point = max(series, key=lambda p: p.timestamp)
        return float(point.value)
    except (TypeError, ValueError, AttributeError):
        return None


def replica_figures(ctx: Any) -> dict[str, list[float]]:
    """Each signal's value per running replica; a replica that has not reported is left out."""
    raw: Mapping[str, Mapping[Any, Any]] = {}
    aggregated: Mapping[str, Mapping[Any, float]] = {}
    try:
        raw = ctx.raw_metrics or {}
    except Exception:  # noqa: BLE001 - a figure Serve cannot give is a figure we do without
        log.debug("llm policy: no raw metrics", exc_info=True)
    try:
        aggregated = ctx.aggregated_metrics or {}
    except Exception:  # noqa: BLE001
        log.debug("llm policy: no aggregated metrics", exc_info=True)
    out: dict[str, list[float]] = {}
    for name in load_signals.SIGNALS:
        values = []
        per_replica = {**aggregated.get(name, {}), **{r: v for r, s in raw.get(name, {}).items() if (v := _latest(s)) is not None}}
        for replica in ctx.running_replicas:
            if replica in per_replica:
                values.append(float(per_replica[replica]))
        out[name] = values
    return out


def signals_from_context(ctx: Any, now: float) -> Signals:
    figures = replica_figures(ctx)
    queued = float(ctx.total_queued_requests or 0.0)
    ttfts = figures[load_signals.TTFT_P90_MS]
    return Signals(
        now=now,
        target_replicas=int(ctx.target_num_replicas),
        running_replicas=int(ctx.current_num_replicas),
        queued=queued,
        waiting=sum(figures[load_signals.WAITING]),
        running=sum(figures[load_signals.RUNNING]),
        ongoing=float(ctx.total_num_requests or 0.0),
        tokens_per_s=sum(figures[load_signals.TOKENS_PER_S]),
        ttft_p90_ms=max(ttfts) if ttfts else 0.0,
    )


def state_from_dict(raw: Mapping[str, Any]) -> PolicyState:
    return PolicyState(**{field: raw.get(key) for field, key in _STATE_KEYS.items()})


def state_to_dict(state: PolicyState) -> dict[str, Any]:
    return {key: getattr(state, field) for field, key in _STATE_KEYS.items()}


class LLMPolicy:
    """Called by Serve as ``policy(ctx) -> (replicas, policy_state)``."""

    def __init__(
        self,
        target_ongoing_requests: float,
        target_tokens_per_s: float | None = None,
        ttft_slo_ms: float | None = None,
        scale_down_utilization: float = 0.7,
        upscale_delay_s: float = 0.0,
        downscale_delay_s: float = 0.0,
        downscale_to_zero_delay_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.knobs = dict(
            target_ongoing_requests=target_ongoing_requests,
            target_tokens_per_s=target_tokens_per_s,
            ttft_slo_ms=ttft_slo_ms,
            scale_down_utilization=scale_down_utilization,
            upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s,
            downscale_to_zero_delay_s=downscale_to_zero_delay_s,
        )
        self.clock = clock
        self.last: Decision | None = None

    def params(self, ctx: Any) -> PolicyParams:
        # Bounds come from Serve, adjusted for its target capacity (a cluster-wide dial).
        return PolicyParams(min_replicas=int(ctx.capacity_adjusted_min_replicas), max_replicas=int(ctx.capacity_adjusted_max_replicas),
                            **self.knobs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        previous = dict(ctx.policy_state or {})
        now = ctx.current_time if getattr(ctx, "current_time", None) is not None else self.clock()
        signals = signals_from_context(ctx, now)
        decision = decide(self.params(ctx), signals, state_from_dict(previous))
        if decision.replicas != signals.target_replicas:
            log.info(
                "llm policy %s: %d -> %d replicas (%s; demand %.2f, queued %.0f, waiting %.0f, running %.0f, %.0f tok/s, ttft p90 %.0f ms)",
                ctx.deployment_name, signals.target_replicas, decision.replicas, decision.reason, decision.demand,
                signals.queued, signals.waiting, signals.running, signals.tokens_per_s, signals.ttft_p90_ms,
            )
        self.last = decision
        # Keep Serve's own keys (its delay counters live in the same dict).
        return decision.replicas, {**previous, **state_to_dict(decision.state)}
