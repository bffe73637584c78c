"""The LLM-aware autoscaling decision as tables, its one wrapper over Serve's context, and
the replica's load signals."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from autoscaling.policy import PolicyParams, PolicyState, Signals, decide
from autoscaling.serve_policy import LLMPolicy, signals_from_context
from cluster import load_signals
from cluster.config import LLM_POLICY_PATH, AutoscalingConfig
from cluster.load_signals import LoadTracker

P = PolicyParams(
    target_ongoing_requests=4,
    min_replicas=1,
    max_replicas=8,
    target_tokens_per_s=100,
    ttft_slo_ms=200,
    scale_down_utilization=0.5,
    upscale_delay_s=2,
    downscale_delay_s=10,
    downscale_to_zero_delay_s=30,
)
ZERO = replace(P, min_replicas=0)


def S(now: float = 100.0, target: int = 2, **kw: Any) -> Signals:
    return Signals(now=now, target_replicas=target, running_replicas=target, **kw)


# (case, params, signals, previous state, replicas, reason, new state)
CASES = [
    ("in the dead band: hold", P, S(running=6), PolicyState(), 2, "hold", PolicyState()),
    ("requests over target: the up wish starts the clock", P, S(running=8, waiting=4), PolicyState(), 2, "wait-up:requests",
     PolicyState(up_since=100.0)),
    ("up wish held for the delay: scale to the demand", P, S(running=8, waiting=4, queued=8), PolicyState(up_since=98.0), 5,
     "up:requests", PolicyState()),
    ("queued requests at callers count too", P, S(running=8, queued=12), PolicyState(up_since=90.0), 5, "up:requests", PolicyState()),
    ("Serve's ongoing count is a floor", P, S(ongoing=20), PolicyState(up_since=90.0), 5, "up:requests", PolicyState()),
    ("tokens over capacity with few requests", P, S(running=4, tokens_per_s=350), PolicyState(up_since=90.0), 4, "up:tokens",
     PolicyState()),
    ("TTFT over its SLO while requests wait: one more at least", P, S(running=6, waiting=1, ttft_p90_ms=250), PolicyState(up_since=90.0),
     3, "up:ttft", PolicyState()),
    ("TTFT far over: at most double", P, S(running=6, waiting=1, ttft_p90_ms=2000), PolicyState(up_since=90.0), 4, "up:ttft",
     PolicyState()),
    ("TTFT over but nothing waits: more replicas would not help", P, S(running=6, ttft_p90_ms=900), PolicyState(), 2, "hold",
     PolicyState()),
    ("capped at max_replicas", P, S(target=8, running=80), PolicyState(up_since=0.0), 8, "hold", PolicyState()),
    ("up to the max when the demand is over it", P, S(target=6, running=80), PolicyState(up_since=0.0), 8, "up:requests", PolicyState()),
    ("a dip breaks the up wish", P, S(running=5), PolicyState(up_since=99.0), 2, "hold", PolicyState()),
    ("low load starts the down clock", P, S(target=4, running=3), PolicyState(), 4, "wait-down", PolicyState(down_since=100.0)),
    ("low load held: down to the hysteresis count", P, S(target=4, running=3), PolicyState(down_since=90.0), 2, "down", PolicyState()),
    ("hysteresis: load filling 75% of 3 replicas keeps 4", P, S(target=4, running=9), PolicyState(down_since=0.0), 4, "hold",
     PolicyState()),
    ("a TTFT near its SLO blocks scale-down", P, S(target=4, running=3, ttft_p90_ms=150), PolicyState(down_since=0.0), 4, "hold",
     PolicyState()),
    ("min_replicas 1: idle stays at one", P, S(target=1), PolicyState(down_since=0.0), 1, "hold", PolicyState()),
    ("idle from 3: first down to one, never straight to zero", ZERO, S(target=3), PolicyState(down_since=80.0), 1, "down", PolicyState()),
    ("idle at one: the longer to-zero delay starts", ZERO, S(target=1), PolicyState(), 1, "wait-to-zero", PolicyState(down_since=100.0)),
    ("idle at one, not yet long enough", ZERO, S(target=1), PolicyState(down_since=80.0), 1, "wait-to-zero", PolicyState(down_since=80.0)),
    ("idle at one for the to-zero delay: zero", ZERO, S(target=1), PolicyState(down_since=70.0), 0, "to-zero", PolicyState()),
    ("tokens still flowing lately: not idle", ZERO, S(target=1, tokens_per_s=5), PolicyState(down_since=0.0), 1, "hold", PolicyState()),
    ("zero replicas and a request: one at once, no delay", ZERO, S(target=0, queued=1), PolicyState(), 1, "cold-start", PolicyState()),
    ("zero replicas and a crowd: the demand at once", ZERO, S(target=0, queued=13), PolicyState(), 4, "cold-start", PolicyState()),
    ("zero replicas and no request: stay at zero", ZERO, S(target=0), PolicyState(), 0, "idle", PolicyState()),
    ("no SLO and no token target: requests only", replace(P, ttft_slo_ms=None, target_tokens_per_s=None),
     S(running=4, tokens_per_s=10_000, waiting=1, ttft_p90_ms=10_000), PolicyState(), 2, "hold", PolicyState()),
]


@pytest.mark.parametrize(("params", "signals", "state", "replicas", "reason", "new_state"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_decide(params: PolicyParams, signals: Signals, state: PolicyState, replicas: int, reason: str, new_state: PolicyState) -> None:
    d = decide(params, signals, state)
    assert (d.replicas, d.reason, d.state) == (replicas, reason, new_state)


def test_no_flapping_under_a_steady_load_near_the_target() -> None:
    """A load that wobbles around one replica's target never moves the count once it is up."""
    state, target, counts = PolicyState(), 3, []
    for step in range(200):
        load = 11 + (step % 3) - 1  # 10..12 requests: 2.5..3 replicas' worth
        d = decide(P, S(now=float(step), target=target, running=load), state)
        state, target = d.state, d.replicas
        counts.append(target)
    assert set(counts) == {3}


def test_a_burst_scales_up_after_the_delay_and_down_after_its_own() -> None:
    state, target, now, seen = PolicyState(), 1, 0.0, []
    for step in range(400):
        now = step * 0.1
        load = 20 if 5 <= now < 15 else 1
        d = decide(P, S(now=now, target=target, running=load), state)
        if d.replicas != target:
            seen.append((round(now, 1), d.replicas))
        state, target = d.state, d.replicas
    # up 2 s after the burst began, down 10 s after it ended (to the hysteresis count: 1)
    assert seen == [(7.0, 5), (25.0, 1)]


# --- the wrapper over Serve's context ---------------------------------------------------


@dataclass
class Point:
    timestamp: float
    value: float


@dataclass
class FakeContext:
    """The fields of Ray Serve's AutoscalingContext the wrapper reads."""

    target_num_replicas: int = 2
    current_num_replicas: int = 2
    running_replicas: list = field(default_factory=lambda: ["r1", "r2"])
    total_num_requests: float = 0.0
    total_queued_requests: float = 0.0
    raw_metrics: dict = field(default_factory=dict)
    aggregated_metrics: dict = field(default_factory=dict)
    capacity_adjusted_min_replicas: int = 1
    capacity_adjusted_max_replicas: int = 8
    policy_state: dict = field(default_factory=dict)
    current_time: float | None = 100.0
    deployment_name: str = "code-v1"


def test_signals_from_context_sums_replicas_and_takes_the_worst_ttft() -> None:
    ctx = FakeContext(
        total_num_requests=9,
        total_queued_requests=3,
        raw_metrics={
            load_signals.WAITING: {"r1": [Point(1, 5), Point(2, 1)], "r2": [Point(2, 2)], "gone": [Point(2, 50)]},
            load_signals.TTFT_P90_MS: {"r1": [Point(2, 80)], "r2": [Point(2, 300)]},
        },
        aggregated_metrics={load_signals.RUNNING: {"r1": 2.0, "r2": 3.0}, load_signals.TOKENS_PER_S: {"r1": 40.0, "r2": 60.0}},
    )
    s = signals_from_context(ctx, now=5.0)
    # the latest raw point wins; replicas no longer running are left out
    assert (s.waiting, s.running, s.queued, s.ongoing) == (3.0, 5.0, 3.0, 9.0)
    assert (s.tokens_per_s, s.ttft_p90_ms, s.target_replicas, s.now) == (100.0, 300.0, 2, 5.0)


def test_the_policy_keeps_serves_own_state_and_its_clock() -> None:
    policy = LLMPolicy(**AutoscalingConfig(policy="llm", max_replicas=8, upscale_delay_s=2).policy_kwargs())
    ctx = FakeContext(total_num_requests=40, policy_state={"serve_internal": 1})
    replicas, state = policy(ctx)
    assert replicas == 2 and state == {"serve_internal": 1, "slm_up_since": 100.0, "slm_down_since": None}
    ctx = FakeContext(total_num_requests=40, policy_state=state, current_time=102.0)
    replicas, state = policy(ctx)
    assert replicas == 8 and policy.last is not None and policy.last.reason == "up:requests"


def test_a_context_without_custom_metrics_falls_back_to_serves_counts() -> None:
    class Broken:
        """Serve evaluates the metrics lazily; a failure there must not stop scaling."""

        def __init__(self) -> None:
            self.ctx = FakeContext(total_num_requests=7)

        def __getattr__(self, name: str) -> Any:
            if name in ("raw_metrics", "aggregated_metrics"):
                raise RuntimeError("not collected")
            return getattr(self.ctx, name)

    s = signals_from_context(Broken(), now=1.0)
    assert (s.ongoing, s.waiting, s.running, s.tokens_per_s) == (7.0, 0.0, 0.0, 0.0)


# --- config -> Serve options ------------------------------------------------------------


def test_llm_policy_serve_options_hand_every_delay_to_the_policy() -> None:
    cfg = AutoscalingConfig(policy="llm", min_replicas=0, max_replicas=4, upscale_delay_s=3, downscale_delay_s=20,
                            ttft_slo_ms=250, target_tokens_per_s=400, look_back_period_s=5, metrics_interval_s=0.5)
    opts = cfg.serve_options()
    assert (opts["upscale_delay_s"], opts["downscale_delay_s"], opts["downscale_to_zero_delay_s"]) == (0, 0, 0)
    assert opts["policy"]["policy_function"] == LLM_POLICY_PATH
    kwargs = opts["policy"]["policy_kwargs"]
    assert kwargs["upscale_delay_s"] == 3 and kwargs["downscale_delay_s"] == 20 and kwargs["downscale_to_zero_delay_s"] == 20
    assert kwargs["ttft_slo_ms"] == 250 and kwargs["target_tokens_per_s"] == 400
    assert (opts["look_back_period_s"], opts["metrics_interval_s"]) == (5, 0.5)
    # Serve accepts the shape and finds the class by its dotted path.
    ray_config = pytest.importorskip("ray.serve.config")
    assert ray_config.AutoscalingConfig(**opts).policy.policy_function == LLM_POLICY_PATH


def test_default_policy_options_are_unchanged() -> None:
    assert AutoscalingConfig().serve_options() == {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4.0,
        "upscale_delay_s": 10.0, "downscale_delay_s": 120.0,
    }


def test_metrics_interval_must_be_inside_the_look_back() -> None:
    with pytest.raises(ValueError, match="metrics_interval_s"):
        AutoscalingConfig(metrics_interval_s=30)


# --- the replica's signals --------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_load_tracker_counts_waiting_running_tokens_and_ttft() -> None:
    clock = Clock()
    tracker = LoadTracker(window_s=10, clock=clock)
    a, b = tracker.start(), tracker.start()
    assert tracker.snapshot()[load_signals.WAITING] == 2
    clock.t = 0.1
    tracker.tokens(a, 1)  # a's first token after 100 ms
    clock.t = 0.5
    tracker.tokens(a, 3)
    snap = tracker.snapshot()
    assert (snap[load_signals.WAITING], snap[load_signals.RUNNING]) == (1, 1)
    assert snap[load_signals.TTFT_P90_MS] == pytest.approx(100)
    tracker.finish(a, completion_tokens=10)  # the usage tops up the tokens not seen one by one
    tracker.finish(a, completion_tokens=10)  # idempotent
    tracker.finish(b)  # aborted before its first token
    snap = tracker.snapshot()
    assert (snap[load_signals.WAITING], snap[load_signals.RUNNING], snap[load_signals.TOKENS_PER_S]) == (0, 0, 1.0)
    clock.t = 20  # everything has left the window
    assert tracker.snapshot() == {load_signals.WAITING: 0, load_signals.RUNNING: 0, load_signals.TOKENS_PER_S: 0, load_signals.TTFT_P90_MS: 0}


def test_usage_top_up_without_streamed_text_counts_tokens_but_no_first_token_time() -> None:
    clock = Clock()
    tracker = LoadTracker(window_s=10, clock=clock)
    gen = tracker.start()
    clock.t = 4.0  # a whole answer in one go at the end: its end is not a first token
    tracker.finish(gen, completion_tokens=20)
    snap = tracker.snapshot()
    assert snap[load_signals.TOKENS_PER_S] == 2.0 and snap[load_signals.TTFT_P90_MS] == 0
    assert (snap[load_signals.WAITING], snap[load_signals.RUNNING]) == (0, 0)


def test_quantile_is_nearest_rank() -> None:
    assert load_signals.quantile([], 0.9) == 0
    assert load_signals.quantile([float(i) for i in range(1, 11)], 0.9) == 9
    assert load_signals.quantile([5.0], 0.9) == 5
