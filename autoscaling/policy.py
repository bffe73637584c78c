"""The LLM-aware autoscaling decision: a pure function of the load signals, the clock and
the previous state.

Why not Serve's default (ongoing requests / target): an LLM replica's trouble shows first
as requests *waiting* (for a slot at the caller, or for prefill in the engine) and as a
growing time to first token, long before its request count looks unusual, and a replica
decoding long answers is busy with few requests. So the demand, in replicas, is the
largest of:

- requests: (queued at callers + waiting + running) / ``target_ongoing_requests``;
- tokens: generated tokens per second / ``target_tokens_per_s`` (when set);
- TTFT: while the replicas' p90 TTFT is over ``ttft_slo_ms`` *and* requests wait, the
  current count times TTFT/SLO (at most double, at least one more). Waiting is required
  because a slow first token with an empty queue is not cured by more replicas (and the
  p90 window outlives a burst).

Hysteresis: up when the demand exceeds the replicas; down only to the count that the
demand fills to at most ``scale_down_utilization`` of its targets, and never while the
TTFT is within that share of its SLO. Delays: the wish must hold for
``upscale_delay_s`` / ``downscale_delay_s`` (``downscale_to_zero_delay_s`` for the
last replica) without a break; from zero any request scales to one at once, because that
request is waiting for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

_EPS = 1e-9
MAX_TTFT_STEP = 2.0  # the TTFT signal at most doubles the replicas per decision


@dataclass(frozen=True)
class PolicyParams:
    target_ongoing_requests: float
    min_replicas: int
    max_replicas: int
    target_tokens_per_s: float | None = None
    ttft_slo_ms: float | None = None
    scale_down_utilization: float = 0.7
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 0.0
    downscale_to_zero_delay_s: float = 0.0


@dataclass(frozen=True)
class Signals:
    """What the deployment looks like at ``now`` (seconds, any monotonic-enough clock)."""

    now: float
    target_replicas: int  # what the autoscaler last asked for
    running_replicas: int = 0
    queued: float = 0.0  # requests waiting at callers for a replica slot
    waiting: float = 0.0  # accepted by replicas, no first token yet
    running: float = 0.0  # decoding
    ongoing: float = 0.0  # Serve's own count (queued + at replicas); a floor for the above
    tokens_per_s: float = 0.0  # summed over replicas
    ttft_p90_ms: float = 0.0  # worst replica; 0 when unknown


@dataclass(frozen=True)
class PolicyState:
    """When the current wish to go up or down began (None: no such wish now)."""

    up_since: float | None = None
    down_since: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: PolicyState
    reason: str  # for logs and tests: which signal or rule decided
    demand: float  # replicas the load asks for, before hysteresis, delays and bounds


def requests_in_flight(s: Signals) -> float:
    return max(s.ongoing, s.queued + s.waiting + s.running)


def demand(p: PolicyParams, s: Signals) -> tuple[float, str]:
    """(replicas the load asks for, the signal that asks most)."""
    asks = {"requests": requests_in_flight(s) / p.target_ongoing_requests}
    if p.target_tokens_per_s:
        asks["tokens"] = s.tokens_per_s / p.target_tokens_per_s
    if ttft_breached(p, s):
        base = max(s.target_replicas, 1)
        asks["ttft"] = max(base + 1.0, base * min(s.ttft_p90_ms / p.ttft_slo_ms, MAX_TTFT_STEP))  # type: ignore[operator]
    signal = max(asks, key=lambda k: asks[k])
    return asks[signal], signal


def ttft_breached(p: PolicyParams, s: Signals) -> bool:
    return bool(p.ttft_slo_ms and s.ttft_p90_ms > p.ttft_slo_ms and s.queued + s.waiting > 0)


def ttft_tight(p: PolicyParams, s: Signals) -> bool:
    """TTFT close enough to its SLO that removing a replica would risk breaking it."""
    return bool(p.ttft_slo_ms and s.ttft_p90_ms > p.ttft_slo_ms * p.scale_down_utilization)


def _bound(p: PolicyParams, n: int) -> int:
    return max(p.min_replicas, min(p.max_replicas, n))


def decide(p: PolicyParams, s: Signals, state: PolicyState) -> Decision:
    """The replicas to ask for now, and the state to pass to the next call."""
    need, signal = demand(p, s)
    current = s.target_replicas
    busy = requests_in_flight(s) > 0
    if current == 0:
        # Cold: a request is waiting for this replica right now; no delay is worth it.
        if busy:
            return Decision(_bound(p, max(1, math.ceil(need - _EPS))), PolicyState(), "cold-start", need)
        return Decision(_bound(p, 0), PolicyState(), "idle", need)

    up = math.ceil(need - _EPS)
    # The fewest replicas that carry the load at the scale-down utilisation; one while
    # anything runs or was produced lately, zero only when idle.
    down = math.ceil(need / p.scale_down_utilization - _EPS)
    if busy or s.tokens_per_s > 0:
        down = max(down, 1)

    if up > current and _bound(p, up) > current:
        since = state.up_since if state.up_since is not None else s.now
        if s.now - since + _EPS >= p.upscale_delay_s:
            return Decision(_bound(p, up), PolicyState(), f"up:{signal}", need)
        return Decision(current, PolicyState(up_since=since), f"wait-up:{signal}", need)

    if down < current and _bound(p, down) < current and not ttft_tight(p, s):
        since = state.down_since if state.down_since is not None else s.now
        to_zero = current == 1 and down == 0
        delay = p.downscale_to_zero_delay_s if to_zero else p.downscale_delay_s
        if s.now - since + _EPS >= delay:
            # Never straight past one to zero: the last replica has its own (longer) idle
            # delay, so a deployment first settles at one.
            target = 0 if to_zero else max(down, 1)
            return Decision(_bound(p, target), PolicyState(), "to-zero" if to_zero else "down", need)
        return Decision(current, replace(PolicyState(), down_since=since), "wait-to-zero" if to_zero else "wait-down", need)

    return Decision(_bound(p, current), PolicyState(), "hold", need)
