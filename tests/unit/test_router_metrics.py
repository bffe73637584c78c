"""router_models.metrics: RouteLLM's cost-quality metrics on small synthetic label sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from router_models.metrics import (
    cost_quality_curve,
    cpt,
    domain_accuracy,
    pgr,
    random_report,
    random_scores,
    router_report,
    share_for_quality,
    subject_prior_scores,
)

# 1000 requests: 60% both right, 15% only strong right (A), 5% only weak right (B), 20% both wrong.
A, B = 0.15, 0.05
_kinds = np.repeat([0, 1, 2, 3], [600, 150, 50, 200])
_perm = np.random.default_rng(7).permutation(len(_kinds))
KIND = _kinds[_perm]
WEAK = np.isin(KIND, [0, 2])
STRONG = np.isin(KIND, [0, 1])
ORACLE = (~WEAK & STRONG).astype(float)  # exactly the requests strong fixes
REVERSED = -ORACLE
QW, QS = 0.65, 0.75


def _naive_curve(scores: np.ndarray, cutoffs: np.ndarray) -> list[tuple[float, float]]:
    """RouteLLM's loop, literally: >= every cutoff but the last, which uses >."""
    points = []
    for i, c in enumerate(cutoffs):
        sel = scores >= c if i != len(cutoffs) - 1 else scores > c
        points.append((sel.mean(), np.where(sel, STRONG, WEAK).mean()))
    return sorted(points, key=lambda p: p[0])


def test_labels_fixture_has_the_intended_qualities() -> None:
    assert (WEAK.mean(), STRONG.mean()) == pytest.approx((QW, QS))


@pytest.mark.parametrize("num_thresholds", [10, 4, None])
def test_curve_matches_routellm_loop_and_spans_zero_to_one(num_thresholds: int | None) -> None:
    scores = np.round(np.random.default_rng(1).uniform(size=len(WEAK)), 2)  # rounded: many ties
    shares, quality = cost_quality_curve(scores, WEAK, STRONG, num_thresholds)
    if num_thresholds is None:
        cutoffs = np.append(np.unique(scores), scores.max())
    else:
        cutoffs = np.quantile(scores, np.linspace(0, 1, num_thresholds + 1))
    expected = _naive_curve(scores, cutoffs)
    assert shares.tolist() == pytest.approx([p[0] for p in expected])
    assert quality.tolist() == pytest.approx([p[1] for p in expected])
    assert (shares[0], quality[0], shares[-1], quality[-1]) == pytest.approx((0.0, QW, 1.0, QS))


@pytest.mark.parametrize("num_thresholds", [10, None])
def test_oracle_recovers_the_full_gap_with_the_fewest_strong_calls(num_thresholds: int | None) -> None:
    shares, quality = cost_quality_curve(ORACLE, WEAK, STRONG, num_thresholds)
    oracle_cpt100 = cpt(shares, pgr(quality, QW, QS), 1.0)
    # Each strong call gains at most 1/n, so closing a gap of A - B needs at least that share.
    assert oracle_cpt100 == pytest.approx(A - B)
    for other in (REVERSED, random_scores(len(WEAK), seed=0)):
        s, q = cost_quality_curve(other, WEAK, STRONG, num_thresholds)
        assert cpt(s, pgr(q, QW, QS), 1.0) >= oracle_cpt100


@pytest.mark.parametrize("num_thresholds", [10, None])
def test_oracle_apgr_equals_its_analytic_value(num_thresholds: int | None) -> None:
    # Curve points (0, 0), (A, peak), (1, 1) with peak = A / (A - B): PGR passes 1 because the
    # oracle also keeps the requests only the weak model gets right.
    peak = A / (A - B)
    analytic = A * peak / 2 + (1 - A) * (peak + 1) / 2
    assert router_report(ORACLE, WEAK, STRONG, num_thresholds).apgr == pytest.approx(analytic)


def test_reversed_router_is_worse_than_random_which_is_worse_than_oracle() -> None:
    reversed_apgr = router_report(REVERSED, WEAK, STRONG).apgr
    random_apgr = random_report(WEAK, STRONG, seeds=range(20)).apgr
    assert reversed_apgr < random_apgr < router_report(ORACLE, WEAK, STRONG).apgr


@pytest.mark.parametrize("num_thresholds", [10, None])
def test_random_router_apgr_is_about_one_half(num_thresholds: int | None) -> None:
    report = random_report(WEAK, STRONG, seeds=range(20), num_thresholds=num_thresholds)
    assert report.apgr == pytest.approx(0.5, abs=0.03)
    assert report.cpt50 == pytest.approx(0.5, abs=0.05)  # analytic: CPT(x) = x


@pytest.mark.parametrize("n", [1001, 2001, 13001])
def test_random_router_averages_seeds_whose_share_grids_differ(n: int) -> None:
    # With (n - 1) * 0.1 a whole number, np.quantile's rounded cutoffs land on either side
    # of a score depending on the draw, so seeds' grids differ by a request (this crashed
    # `slmctl router eval` on the whole mmlu_train.jsonl).
    rng = np.random.default_rng(12345)  # not a seed random_report draws its scores from
    weak, strong = rng.random(n) < 0.6, rng.random(n) < 0.8
    grids = {cost_quality_curve(random_scores(n, seed), weak, strong)[0].tobytes() for seed in range(10)}
    assert len(grids) > 1
    report = random_report(weak, strong)
    assert report.apgr == pytest.approx(0.5, abs=0.03)
    assert report.shares[0] == 0.0 and report.shares[-1] == 1.0


def test_random_scores_are_seeded_uniform() -> None:
    a, b = random_scores(500, seed=3), random_scores(500, seed=3)
    assert np.array_equal(a, b) and a.shape == (500,) and 0 <= a.min() and a.max() < 1
    assert not np.array_equal(a, random_scores(500, seed=4))


@pytest.mark.parametrize("scores", [ORACLE, REVERSED, random_scores(1000, seed=5), KIND.astype(float)])
def test_cpt_is_monotonic_in_the_target(scores: np.ndarray) -> None:
    report = router_report(scores, WEAK, STRONG)
    assert 0 <= report.cpt50 <= report.cpt80 <= 1


@pytest.mark.parametrize(
    ("q_target", "expected"),
    [(0.0, 0.0), (QW, 0.0), (QW + 0.5 * (QS - QW), 0.5), (QS, 1.0), (QS + 0.01, math.nan)],
)
def test_share_for_quality_on_a_linear_curve(q_target: float, expected: float) -> None:
    shares = np.linspace(0, 1, 11)
    quality = QW + shares * (QS - QW)
    assert share_for_quality(shares, quality, q_target) == pytest.approx(expected, nan_ok=True)


def test_report_cost_reduction_is_one_minus_share() -> None:
    report = router_report(random_scores(1000, seed=2), WEAK, STRONG)
    assert 0 <= report.share_for_95 <= 1
    assert report.cost_reduction_at_95 == pytest.approx(1 - report.share_for_95)
    assert (report.n, report.quality_weak, report.quality_strong) == (1000, pytest.approx(QW), pytest.approx(QS))


def test_ties_go_one_way_whatever_the_input_order() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    weak, strong = np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 1], bool)
    shares, quality = cost_quality_curve(scores, weak, strong, num_thresholds=None)
    assert shares.tolist() == [0.0, 0.25, 0.75, 1.0]  # the 0.5 pair is never split
    assert quality.tolist() == [0.5, 0.5, 0.5, 0.75]
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        s2, q2 = cost_quality_curve(scores[perm], weak[perm], strong[perm], num_thresholds=None)
        assert (s2.tolist(), q2.tolist()) == (shares.tolist(), quality.tolist())


def test_constant_scores_route_all_or_nothing() -> None:
    shares, _ = cost_quality_curve(np.zeros(len(WEAK)), WEAK, STRONG)
    assert set(shares.tolist()) == {0.0, 1.0}


def test_subject_prior_uses_the_strong_fixes_rate_and_global_rate_for_unseen() -> None:
    subjects = ["law", "law", "law", "law", "math", "math"]
    weak = [False, False, True, True, False, True]
    strong = [True, False, True, False, True, True]
    scores = subject_prior_scores(subjects, weak, strong, ["law", "math", "art"])
    assert scores.tolist() == pytest.approx([1 / 4, 1 / 2, 2 / 6])


def test_domain_accuracy() -> None:
    assert domain_accuracy(["code", "math", "legal"], ["code", "math", "medical"]) == pytest.approx(2 / 3)


def test_to_dict_is_strict_json() -> None:
    payload = router_report(ORACLE, WEAK, STRONG).to_dict()
    decoded = json.loads(json.dumps(payload, allow_nan=False))
    assert decoded["n"] == 1000 and len(decoded["shares"]) == len(decoded["qualities"]) == 11


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cost_quality_curve([0.1, 0.2], [True], [True, False]), "length mismatch"),
        (lambda: cost_quality_curve([0.1], [True, True], [True, False]), "length mismatch"),
        (lambda: cost_quality_curve([], [], []), "empty"),
        (lambda: cost_quality_curve([[0.1]], [True], [True]), "1-D"),
        (lambda: cost_quality_curve([math.nan], [True], [True]), "finite"),
        (lambda: cost_quality_curve([0.1], [True], [True], num_thresholds=0), "num_thresholds"),
        (lambda: router_report([0.1, 0.2], [True, False], [True, False]), "undefined"),
        (lambda: random_scores(0, seed=0), "n must be"),
        (lambda: random_report([True], [False], seeds=[]), "seeds"),
        (lambda: subject_prior_scores(["a"], [True, False], [True, False], ["a"]), "length mismatch"),
        (lambda: domain_accuracy(["code"], []), "length mismatch"),
        (lambda: domain_accuracy([], []), "empty"),
    ],
)
def test_invalid_input_raises_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
