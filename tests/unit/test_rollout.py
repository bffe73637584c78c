"""The canary rollout state machine: every transition and analysis rule as a table row."""

from __future__ import annotations

import pytest

from autoscaling import rollout as ro
from autoscaling.rollout import Figures, RolloutSpec

SPEC = RolloutSpec(model="code", stable="v1", candidate="v2", steps=(10, 50, 100), interval_s=60, min_requests=20, failure_limit=2)
HEALTHY = Figures(requests=100, errors=1, p95_latency_s=1.0, p95_ttft_s=0.2, gated=100, escalated=20)


def analysis(candidate: Figures, stable: Figures = HEALTHY, now: float = 60.0, spec: RolloutSpec = SPEC) -> ro.Analysis:
    return ro.analyse(spec, stable, candidate, now)


# --- analysis ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "verdict", "failed"),
    [
        (HEALTHY, "pass", []),
        (Figures(requests=19, errors=19), "wait", []),  # below min_requests: no judgement
        (Figures(requests=100, errors=3, p95_latency_s=1.0, p95_ttft_s=0.2), "fail", ["error_rate"]),
        (Figures(requests=100, errors=2, p95_latency_s=1.0, p95_ttft_s=0.2), "pass", []),  # 2% is the limit
        (Figures(requests=100, p95_latency_s=1.6, p95_ttft_s=0.2), "fail", ["p95_latency_ratio"]),
        (Figures(requests=100, p95_latency_s=1.5, p95_ttft_s=0.31), "fail", ["p95_ttft_ratio"]),
        (Figures(requests=100, p95_latency_s=1.0, p95_ttft_s=0.2, gated=100, escalated=31), "fail", ["escalation_ratio"]),
        (Figures(requests=100, p95_latency_s=1.0, p95_ttft_s=0.2, gated=100, escalated=30), "pass", []),
        (Figures(requests=100, errors=50, p95_latency_s=9.0), "fail", ["error_rate", "p95_latency_ratio"]),
        (Figures(requests=100), "pass", []),  # no latency figures on the candidate side: only errors judged
    ],
)
def test_analyse(candidate: Figures, verdict: str, failed: list[str]) -> None:
    a = analysis(candidate)
    assert a.verdict == verdict
    assert [c.name for c in a.checks if not c.ok] == failed


def test_latencies_under_50_ms_are_not_judged_by_ratio() -> None:
    stable = Figures(requests=100, p95_latency_s=0.0015, p95_ttft_s=0.001)
    assert analysis(Figures(requests=100, p95_latency_s=0.003, p95_ttft_s=0.004), stable).verdict == "pass"
    assert analysis(Figures(requests=100, p95_latency_s=0.2, p95_ttft_s=0.004), stable).verdict == "fail"


def test_a_stable_figure_of_zero_is_floored() -> None:
    stable = Figures(requests=100, gated=100, escalated=0)
    a = analysis(Figures(requests=100, gated=100, escalated=1), stable)  # 1% against 0%: ratio 1.0 with the 1% floor
    assert a.verdict == "pass"


# --- transitions ------------------------------------------------------------------------


def test_a_healthy_candidate_walks_the_steps_and_is_promoted() -> None:
    r = ro.start(SPEC, now=0)
    assert r.weights == {"v2": 10, "v1": 90} and not r.due(59) and r.due(60)
    r = ro.advance(r, analysis(HEALTHY, now=60))
    assert r.weights == {"v2": 50, "v1": 50} and r.step_started_at == 60 and not r.due(100)
    r = ro.advance(r, analysis(HEALTHY, now=120))
    assert r.weights == {"v2": 100, "v1": 0} and r.state == "progressing"
    r = ro.advance(r, analysis(HEALTHY, now=180))
    assert r.state == "promoted" and r.weights == {"v2": 100, "v1": 0} and r.finished


def test_failure_limit_failed_checks_in_a_row_roll_back() -> None:
    bad = Figures(requests=100, errors=30)
    r = ro.advance(ro.start(SPEC, 0), analysis(bad, now=60))
    assert r.state == "progressing" and r.failures == 1 and r.weights["v2"] == 10 and r.step_started_at == 60
    r = ro.advance(r, analysis(bad, now=120))
    assert r.state == "failed" and r.weights == {"v2": 0, "v1": 100}
    assert "failed at 10%" in r.history[-1]


def test_a_pass_resets_the_failure_count() -> None:
    bad = Figures(requests=100, errors=30)
    r = ro.advance(ro.start(SPEC, 0), analysis(bad, now=60))
    r = ro.advance(r, analysis(HEALTHY, now=120))
    assert r.failures == 0 and r.weights["v2"] == 50
    r = ro.advance(r, analysis(bad, now=180))
    assert r.state == "progressing" and r.failures == 1


def test_too_few_requests_extends_the_step() -> None:
    r = ro.advance(ro.start(SPEC, 0), analysis(Figures(requests=3), now=60))
    assert r.state == "progressing" and r.step == 0 and r.failures == 0 and r.step_started_at == 60


def test_failure_limit_one_rolls_back_at_the_first_failed_check() -> None:
    spec = RolloutSpec(model="code", stable="v1", candidate="v3", failure_limit=1)
    r = ro.advance(ro.start(spec, 0), ro.analyse(spec, HEALTHY, Figures(requests=50, errors=15), 60))
    assert r.state == "failed" and r.weights["v3"] == 0


@pytest.mark.parametrize(
    ("op", "from_state", "to_state"),
    [
        (ro.pause, "progressing", "paused"),
        (ro.resume, "paused", "progressing"),
        (ro.promote, "progressing", "promoted"),
        (ro.promote, "paused", "promoted"),
        (ro.abort, "progressing", "rolled_back"),
        (ro.abort, "paused", "rolled_back"),
    ],
)
def test_operator_transitions(op, from_state: str, to_state: str) -> None:
    r = ro.start(SPEC, 0)
    if from_state == "paused":
        r = ro.pause(r, 1)
    r = op(r, 5)
    assert r.state == to_state
    if to_state == "rolled_back":
        assert r.weights == {"v2": 0, "v1": 100}
    if to_state == "promoted":
        assert r.weights == {"v2": 100, "v1": 0}


@pytest.mark.parametrize(
    ("op", "state"),
    [(ro.pause, "paused"), (ro.resume, "progressing"), (ro.promote, "promoted"), (ro.abort, "rolled_back"), (ro.pause, "failed")],
)
def test_transitions_that_the_state_refuses(op, state: str) -> None:
    r = ro.start(SPEC, 0)
    r = {"paused": lambda: ro.pause(r, 1), "progressing": lambda: r, "promoted": lambda: ro.promote(r, 1),
         "rolled_back": lambda: ro.abort(r, 1), "failed": lambda: ro.advance(ro.advance(r, analysis(Figures(requests=99, errors=99), now=60)),
                                                                               analysis(Figures(requests=99, errors=99), now=120))}[state]()
    assert r.state == state
    with pytest.raises(ro.RolloutError):
        op(r, 10)


def test_paused_rollouts_are_never_due_and_resume_restarts_the_interval() -> None:
    r = ro.pause(ro.start(SPEC, 0), 30)
    assert not r.due(1000)
    with pytest.raises(ro.RolloutError):
        ro.advance(r, analysis(HEALTHY, now=1000))
    r = ro.resume(r, 1000)
    assert r.step_started_at == 1000 and not r.due(1059) and r.due(1060)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"candidate": "v1"}, "must differ"),
        ({"steps": (50, 10, 100)}, "rise strictly"),
        ({"steps": (10, 50)}, "last step must be 100"),
        ({"steps": ()}, "rise strictly"),
        ({"interval_s": 0}, "interval_s"),
        ({"failure_limit": 0}, "failure_limit"),
    ],
)
def test_bad_specs_are_refused(changes: dict, fragment: str) -> None:
    from dataclasses import replace

    with pytest.raises(ro.RolloutError) as err:
        ro.start(replace(SPEC, **changes), 0)
    assert fragment in err.value.message


def test_round_trip_through_a_dict() -> None:
    r = ro.advance(ro.start(SPEC, 0), analysis(Figures(requests=100, errors=30), now=60))
    again = ro.Rollout.from_dict(r.to_dict())
    assert again == r


def test_a_shadow_phase_comes_first_at_zero_weight() -> None:
    from dataclasses import replace

    spec = replace(SPEC, shadow=True, shadow_share=0.2)
    r = ro.start(spec, 0)
    assert r.shadowing and r.weights == {"v2": 0, "v1": 100} and spec.all_steps == (0, 10, 50, 100)
    r = ro.advance(r, analysis(HEALTHY, now=60, spec=spec))  # judged on the shadow calls' figures
    assert not r.shadowing and r.weights == {"v2": 10, "v1": 90}
    bad = ro.advance(ro.start(spec, 0), analysis(Figures(requests=50, errors=50), now=60, spec=spec))
    assert bad.shadowing and bad.failures == 1  # still shadowing until the failure limit
    assert ro.abort(bad, 70).shadowing is False
    with pytest.raises(ro.RolloutError, match="shadow_share"):
        ro.start(replace(spec, shadow_share=0), 0)
