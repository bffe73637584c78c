"""Cost-quality metrics for a strong/weak router, as RouteLLM reports them, plus baselines.

Definitions follow lm-sys/RouteLLM (Ong et al. 2024, arXiv:2406.18665):

- Routing rule, ``routellm/routers/routers.py`` (``Router.route``): a request goes to the strong
  model when its score is ``>= threshold``. Ties are therefore never split: every request with the
  same score goes the same way, whatever the input order, so the curve is deterministic.
- Thresholds, ``routellm/evals/benchmarks.py`` (``MMLU.evaluate``): the cutoffs are the bin edges
  of ``pd.qcut(scores, num_results=10)``, i.e. the linear-interpolation quantiles at 0, 0.1, .., 1
  (``np.quantile``); every cutoff uses ``>=`` except the last (the maximum), which uses ``>`` so
  that the curve ends at 0% strong calls. ``num_thresholds=10`` reproduces that grid;
  ``num_thresholds=None`` uses every distinct score instead (the exact curve).
- Quality per point: mean of ``strong_correct`` where routed strong, else ``weak_correct``.
- APGR, ``routellm/evals/evaluate.py`` (``apgr_metric``): ``(AUC - weak_AUC) / (strong_AUC -
  weak_AUC)`` with ``np.trapz`` over the strong-call share; equal to the trapezoid area under
  PGR(f) divided by the covered share span (which is 1 here, since the grid runs 0..1).
- CPT(x), ``evaluate.py`` (``pct_call_metric``): ``np.interp`` of the target quality
  ``qw + x (qs - qw)`` on the quality-vs-share curve. ``np.interp`` silently assumes a rising
  curve; we take the *first* crossing, interpolated linearly between the two grid points around
  it, which equals RouteLLM's value whenever the curve rises and stays well defined when not.
  A share between two grid points is reachable in expectation by mixing the two thresholds.
- Cost reduction at 95%: the blog/README report "cost reduction while achieving 95% of GPT-4
  performance" as the calls to the strong model avoided; here ``1 - share`` at
  ``q_target = 0.95 * quality_strong``, found with the same first-crossing rule.
- Random baseline: RouteLLM's ``RandomRouter`` scores ``random.uniform(0, 1)``.
- Subject prior: RouteLLM's classifiers score P(strong model strictly wins); on correctness labels
  that is P(weak wrong and strong right), here estimated per MMLU subject.

Pure numpy: no Ray and no HTTP (the ``router_models`` import contract).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

Curve = tuple[np.ndarray, np.ndarray]  # (strong-call shares ascending, quality at each share)
# numpy 2 renamed trapz (RouteLLM's call) to trapezoid; same rule, keep both versions working.
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


@dataclass(frozen=True)
class RouterReport:
    """A router's cost-quality summary; shares are fractions of requests in [0, 1], NaN = unreachable."""

    n: int
    quality_weak: float
    quality_strong: float
    apgr: float
    cpt50: float
    cpt80: float
    share_for_95: float  # strong-call share needed for 95% of strong-only quality
    cost_reduction_at_95: float  # 1 - share_for_95: strong calls avoided vs strong-only
    num_thresholds: int | None
    shares: tuple[float, ...]
    qualities: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict; NaN becomes None because strict JSON has no NaN."""
        return {k: _json_safe(v) for k, v in asdict(self).items()}


def _json_safe(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    return value


def _as_labels(
    weak_correct: Sequence[bool] | np.ndarray, strong_correct: Sequence[bool] | np.ndarray, n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D bool arrays of one non-empty length (``n`` when given); ValueError otherwise."""
    weak, strong = np.asarray(weak_correct, dtype=bool), np.asarray(strong_correct, dtype=bool)
    if weak.ndim != 1 or strong.ndim != 1:
        raise ValueError("weak_correct and strong_correct must be 1-D")
    if len(weak) == 0:
        raise ValueError("need at least one request, got empty arrays")
    lengths = {"weak_correct": len(weak), "strong_correct": len(strong)} | ({"scores": n} if n is not None else {})
    if len(set(lengths.values())) != 1:
        raise ValueError(f"length mismatch: {lengths}")
    return weak, strong


def cost_quality_curve(
    scores: Sequence[float] | np.ndarray,
    weak_correct: Sequence[bool] | np.ndarray,
    strong_correct: Sequence[bool] | np.ndarray,
    num_thresholds: int | None = 10,
) -> Curve:
    """Quality at each threshold of the grid (see module doc), sorted by strong-call share.

    The first point is always share 0 (quality_weak) and the last share 1 (quality_strong).
    Raises ValueError on empty, mismatched, non-1-D or non-finite input, or num_thresholds < 1.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1:
        raise ValueError("scores must be 1-D")
    weak, strong = _as_labels(weak_correct, strong_correct, n=len(s))
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if num_thresholds is None:
        cutoffs = np.append(np.unique(s), s.max())
    elif num_thresholds >= 1:
        cutoffs = np.quantile(s, np.linspace(0.0, 1.0, num_thresholds + 1))
    else:
        raise ValueError(f"num_thresholds must be >= 1 or None, got {num_thresholds}")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    gain = strong[order].astype(float) - weak[order].astype(float)
    # tail_gain[i]: quality gained by sending sorted requests i.. to strong instead of weak.
    tail_gain = np.append(np.cumsum(gain[::-1])[::-1], 0.0)
    first_strong = np.searchsorted(sorted_s, cutoffs[:-1], side="left")  # score >= cutoff
    first_strong = np.append(first_strong, np.searchsorted(sorted_s, cutoffs[-1], side="right"))  # last: >
    n = len(s)
    shares = (n - first_strong) / n
    quality = (weak.sum() + tail_gain[first_strong]) / n
    by_share = np.argsort(shares, kind="stable")
    return shares[by_share], quality[by_share]


def pgr(quality: np.ndarray, quality_weak: float, quality_strong: float) -> np.ndarray:
    """Performance gap recovered: (q - qw) / (qs - qw). ValueError when qs == qw (no gap to recover)."""
    gap = quality_strong - quality_weak
    if gap == 0:
        raise ValueError("quality_strong equals quality_weak: PGR is undefined without a gap")
    return (np.asarray(quality, dtype=float) - quality_weak) / gap


def apgr(shares: np.ndarray, pgr_values: np.ndarray) -> float:
    """Trapezoid area under PGR(share), divided by the share span (RouteLLM's normalisation)."""
    span = float(shares[-1] - shares[0])
    if span <= 0:
        raise ValueError("the curve covers no range of strong-call shares")
    return float(_trapezoid(pgr_values, shares) / span)


def first_crossing(shares: np.ndarray, values: np.ndarray, target: float) -> float:
    """Smallest share where the piecewise-linear curve first reaches ``target``; NaN if it never does."""
    reached = np.flatnonzero(values >= target)
    if len(reached) == 0:
        return math.nan
    i = int(reached[0])
    if i == 0:
        return float(shares[0])
    f0, f1, v0, v1 = shares[i - 1], shares[i], values[i - 1], values[i]
    return float(f0 + (target - v0) * (f1 - f0) / (v1 - v0))  # v0 < target <= v1, so v1 > v0


def cpt(shares: np.ndarray, pgr_values: np.ndarray, x: float) -> float:
    """Call-performance threshold CPT(x): strong-call share first reaching PGR >= x (x=0.5 for CPT(50%))."""
    return first_crossing(shares, pgr_values, x)


def share_for_quality(shares: np.ndarray, quality: np.ndarray, q_target: float) -> float:
    """Strong-call share first reaching quality >= q_target: 0 if q_target <= quality_weak, NaN if never."""
    return first_crossing(shares, quality, q_target)


def report_from_curve(curve: Curve, num_thresholds: int | None, n: int) -> RouterReport:
    """All metrics of one curve; quality_weak/strong are its share-0 and share-1 end points."""
    shares, quality = curve
    qw, qs = float(quality[0]), float(quality[-1])
    p = pgr(quality, qw, qs)
    share95 = share_for_quality(shares, quality, 0.95 * qs)
    return RouterReport(
        n=n,
        quality_weak=qw,
        quality_strong=qs,
        apgr=apgr(shares, p),
        cpt50=cpt(shares, p, 0.5),
        cpt80=cpt(shares, p, 0.8),
        share_for_95=share95,
        cost_reduction_at_95=1.0 - share95,
        num_thresholds=num_thresholds,
        shares=tuple(float(v) for v in shares),
        qualities=tuple(float(v) for v in quality),
    )


def router_report(
    scores: Sequence[float] | np.ndarray,
    weak_correct: Sequence[bool] | np.ndarray,
    strong_correct: Sequence[bool] | np.ndarray,
    num_thresholds: int | None = 10,
) -> RouterReport:
    """The full report for one router's scores on one eval set (see cost_quality_curve for errors)."""
    curve = cost_quality_curve(scores, weak_correct, strong_correct, num_thresholds)
    return report_from_curve(curve, num_thresholds, n=len(np.asarray(weak_correct)))


def random_scores(n: int, seed: int) -> np.ndarray:
    """RouteLLM's random router: n i.i.d. Uniform(0, 1) scores from a seeded generator."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=n)


def random_report(
    weak_correct: Sequence[bool] | np.ndarray,
    strong_correct: Sequence[bool] | np.ndarray,
    seeds: Iterable[int] = range(10),
    num_thresholds: int | None = 10,
) -> RouterReport:
    """Random routing, its quality curve averaged over seeds before the metrics are taken.

    The seeds' share grids can differ by a request: ``np.quantile`` interpolates each cutoff,
    and where its position in the sorted scores is a whole number up to rounding (it is for
    some sizes, e.g. 10 thresholds over 13,000 requests), the rounded cutoff lands just
    above or just below that score depending on the draw. So each seed's curve, which is
    piecewise linear in the share, is read on the first seed's grid with ``np.interp``
    before averaging. It tends to the analytic qw + f (qs - qw): APGR 0.5, CPT(x) = x.
    """
    weak, strong = _as_labels(weak_correct, strong_correct)
    curves = [cost_quality_curve(random_scores(len(weak), seed), weak, strong, num_thresholds) for seed in seeds]
    if not curves:
        raise ValueError("seeds must not be empty")
    shares = curves[0][0]
    quality = np.mean([np.interp(shares, s, q) for s, q in curves], axis=0)
    return report_from_curve((shares, quality), num_thresholds, n=len(weak))


def subject_prior_scores(
    train_subjects: Sequence[str],
    train_weak: Sequence[bool] | np.ndarray,
    train_strong: Sequence[bool] | np.ndarray,
    eval_subjects: Sequence[str],
) -> np.ndarray:
    """Per eval request, its subject's train rate of (weak wrong and strong right); unseen subjects get the global rate."""
    weak, strong = _as_labels(train_weak, train_strong, n=len(train_subjects))
    needs_strong = (~weak & strong).astype(float)
    subjects = np.asarray(train_subjects, dtype=object)
    rates = {s: float(needs_strong[subjects == s].mean()) for s in set(train_subjects)}
    global_rate = float(needs_strong.mean())
    return np.array([rates.get(s, global_rate) for s in eval_subjects], dtype=float)


def domain_accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    """Fraction of exact label matches; ValueError on empty or mismatched inputs."""
    if len(pred) != len(gold):
        raise ValueError(f"length mismatch: pred has {len(pred)}, gold has {len(gold)}")
    if len(gold) == 0:
        raise ValueError("need at least one label, got empty sequences")
    return float(np.mean(np.asarray(pred, dtype=object) == np.asarray(gold, dtype=object)))
