"""Evaluate a router on labelled prompts, and choose thresholds from a sample of traffic."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router_models.data import GSM8K_SUBJECT, Example
from router_models.heads import predict
from router_models.metrics import domain_accuracy, random_report, router_report


def _labels(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = np.array([ex.has_correctness for ex in examples], dtype=bool)
    weak = np.array([bool(ex.weak_correct) for ex in examples])[mask] if mask.any() else np.zeros(0, bool)
    strong = np.array([bool(ex.strong_correct) for ex in examples])[mask] if mask.any() else np.zeros(0, bool)
    return mask, weak, strong


def prior_scores(arrays: dict[str, np.ndarray], subjects: list[str], examples: Sequence[Example]) -> np.ndarray:
    """The per-subject prior: each request scored by its (gold) subject's training rate of
    'general wrong, frontier right'; unseen subjects get the mean rate."""
    rates = arrays["subject_escalation"]
    index = {s: i for i, s in enumerate(subjects)}
    fallback = float(rates.mean())
    return np.array([rates[index[ex.subject]] if ex.subject in index else fallback for ex in examples], dtype=np.float64)


def evaluate_embedded(arrays: dict[str, np.ndarray], metadata: dict[str, Any], examples: Sequence[Example], X: np.ndarray) -> dict[str, Any]:
    """Domain accuracy (where labelled), math share on GSM8K-style prompts, and RouteLLM's
    cost-quality figures for this router, a random router and the per-subject prior."""
    out = predict(arrays, X, [ex.prompt for ex in examples])
    domains = metadata["domains"]
    predicted = [domains[i] for i in out.domain_probs.argmax(axis=1)]
    report: dict[str, Any] = {"rows": len(examples)}
    with_domain = [i for i, ex in enumerate(examples) if ex.domain]
    if with_domain:
        report["domain_accuracy"] = domain_accuracy([predicted[i] for i in with_domain], [examples[i].domain for i in with_domain])
        report["domain_rows"] = len(with_domain)
    gsm = [i for i, ex in enumerate(examples) if ex.subject == GSM8K_SUBJECT]
    if gsm:
        report["gsm8k_math_share"] = float(np.mean([predicted[i] == "math" for i in gsm]))
        report["gsm8k_rows"] = len(gsm)
    mask, weak, strong = _labels(examples)
    if mask.sum() >= 10 and weak.mean() != strong.mean():
        labelled = [ex for ex, m in zip(examples, mask) if m]
        report["router"] = router_report(out.escalation[mask], weak, strong).to_dict()
        report["random"] = random_report(weak, strong).to_dict()
        report["subject_prior"] = router_report(prior_scores(arrays, metadata["subjects"], labelled), weak, strong).to_dict()
        for key in ("router", "random", "subject_prior"):
            report[key].pop("shares", None)
            report[key].pop("qualities", None)
    return report


def threshold_for_rate(scores: np.ndarray, rate: float) -> float:
    """The threshold that sends about ``rate`` of this traffic to the frontier (score >= t),
    as RouteLLM calibrates: a quantile of scores on a sample of traffic."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("the escalation rate must be within [0, 1]")
    if rate == 0.0:
        return float(np.nextafter(scores.max(), np.inf))
    return float(np.quantile(scores, 1.0 - rate, method="higher"))


def threshold_for_scores_quality(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray, target: float) -> float | None:
    """The highest threshold whose routing reaches ``target`` x frontier-only quality; None if
    even all-frontier does not."""
    order = np.argsort(-scores, kind="stable")
    goal = target * strong.mean()
    # quality when the top-k go to the frontier, for k = 0..n
    gain = np.concatenate([[0.0], np.cumsum(strong[order].astype(float) - weak[order].astype(float))])
    quality = (weak.sum() + gain) / len(scores)
    reached = np.nonzero(quality >= goal - 1e-12)[0]
    if reached.size == 0:
        return None
    k = int(reached[0])
    if k == 0:
        return float(np.nextafter(scores.max(), np.inf))
    return float(scores[order][k - 1])


def threshold_for_quality(arrays: dict[str, np.ndarray], examples: Sequence[Example], X: np.ndarray, target: float) -> float | None:
    mask, weak, strong = _labels(examples)
    if mask.sum() < 10:
        return None
    texts = [ex.prompt for ex, m in zip(examples, mask) if m]
    return threshold_for_scores_quality(predict(arrays, X[mask], texts).escalation, weak, strong, target)
