"""Evaluate a router on labelled prompts, and choose thresholds from a sample of traffic."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router_models.data import GSM8K_SUBJECT, Example, is_chat
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


NO_CORRECTNESS = "no weak_correct/strong_correct labels in this data, so no cost-quality curve (APGR, CPT) can be drawn"


def per_domain(predicted: Sequence[str], gold: Sequence[str], domains: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Precision and recall of each domain (None where nothing was predicted or labelled)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for d in domains:
        tp = sum(p == d and g == d for p, g in zip(predicted, gold))
        n_pred, n_gold = sum(p == d for p in predicted), sum(g == d for g in gold)
        out[d] = {"precision": tp / n_pred if n_pred else None, "recall": tp / n_gold if n_gold else None, "support": n_gold}
    return out


def routed_domains(probs: np.ndarray, domains: Sequence[str], min_confidence: float) -> list[str]:
    """The domain the gateway acts on: the top domain when its probability clears
    ``min_confidence`` (router.min_domain_confidence), else general, as ``decide_auto`` does."""
    top = probs.argmax(axis=1)
    return [domains[i] if probs[n, i] >= min_confidence else "general" for n, i in enumerate(top)]


def escalation_summary(scores: np.ndarray, thresholds: dict[str, Any], predicted: Sequence[str] | None = None) -> dict[str, Any]:
    """The escalation score's distribution, and the share the threshold (and the exam
    threshold, when the artifact keeps one) sends to the frontier. With the predicted
    domains, per-domain thresholds apply and the share is also given per domain."""
    q = np.quantile(scores, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(scores) else [float("nan")] * 5
    threshold = float(thresholds["escalation"])
    by = thresholds.get("by_domain") or {}
    bars = np.array([float(by.get(d, threshold)) for d in predicted]) if predicted is not None else np.full(len(scores), threshold)
    up = scores >= bars
    out: dict[str, Any] = {"rows": int(len(scores)), "p10": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]),
                           "p90": float(q[4]), "threshold": threshold, "share_escalated": float(np.mean(up)) if len(scores) else 0.0}
    if predicted is not None and len(scores):
        out["share_escalated_by_domain"] = {d: float(np.mean(up[[p == d for p in predicted]])) for d in sorted(set(predicted))}
    if "exam_quality_threshold" in thresholds:
        exam = float(thresholds["exam_quality_threshold"])
        out.update(exam_threshold=exam, share_escalated_at_exam_threshold=float(np.mean(scores >= exam)) if len(scores) else 0.0)
    return out


def _chat_section(examples: Sequence[Example], predicted: list[str], routed: list[str], escalation: np.ndarray,
                  domains: Sequence[str], thresholds: dict[str, Any]) -> dict[str, Any]:
    rows = [i for i, ex in enumerate(examples) if is_chat(ex)]
    gold = [examples[i].domain or "" for i in rows]
    return {
        "rows": len(rows),
        "domain_accuracy": domain_accuracy([predicted[i] for i in rows], gold),
        "routed_accuracy": domain_accuracy([routed[i] for i in rows], gold),
        "per_domain": per_domain([predicted[i] for i in rows], gold, domains),
        "routed_per_domain": per_domain([routed[i] for i in rows], gold, domains),
        "escalation": escalation_summary(escalation[rows], thresholds, [predicted[i] for i in rows]),
    }


def evaluate_embedded(arrays: dict[str, np.ndarray], metadata: dict[str, Any], examples: Sequence[Example], X: np.ndarray,
                      min_confidence: float = 0.5) -> dict[str, Any]:
    """Domain accuracy (where labelled), math share on GSM8K-style prompts, chat figures
    (accuracy, per-domain precision and recall, before and after ``min_confidence``, and the
    escalation score's distribution) and RouteLLM's cost-quality figures for this router, a
    random router and the per-subject prior where correctness labels exist."""
    out = predict(arrays, X, [ex.prompt for ex in examples])
    domains = metadata["domains"]
    predicted = [domains[i] for i in out.domain_probs.argmax(axis=1)]
    routed = routed_domains(out.domain_probs, domains, min_confidence)
    report: dict[str, Any] = {"rows": len(examples), "min_domain_confidence": min_confidence}
    with_domain = [i for i, ex in enumerate(examples) if ex.domain]
    if with_domain:
        report["domain_accuracy"] = domain_accuracy([predicted[i] for i in with_domain], [examples[i].domain for i in with_domain])
        report["domain_rows"] = len(with_domain)
    exam_rows = [i for i in with_domain if not is_chat(examples[i])]
    if exam_rows:  # MMLU + GSM8K: the figure exam-only artifacts were measured by
        report["exam_domain_accuracy"] = domain_accuracy([predicted[i] for i in exam_rows], [examples[i].domain for i in exam_rows])
    exams = [i for i, ex in enumerate(examples) if ex.has_correctness and ex.domain]
    if exams:
        report["mmlu_domain_accuracy"] = domain_accuracy([predicted[i] for i in exams], [examples[i].domain for i in exams])
        report["mmlu_rows"] = len(exams)
    gsm = [i for i, ex in enumerate(examples) if ex.subject == GSM8K_SUBJECT]
    if gsm:
        report["gsm8k_math_share"] = float(np.mean([predicted[i] == "math" for i in gsm]))
        report["gsm8k_rows"] = len(gsm)
    if any(is_chat(ex) for ex in examples):
        report["chat"] = _chat_section(examples, predicted, routed, out.escalation, domains, metadata["thresholds"])
    mask, weak, strong = _labels(examples)
    if mask.sum() >= 10 and weak.mean() != strong.mean():
        labelled = [ex for ex, m in zip(examples, mask) if m]
        report["router"] = router_report(out.escalation[mask], weak, strong).to_dict()
        report["random"] = random_report(weak, strong).to_dict()
        report["subject_prior"] = router_report(prior_scores(arrays, metadata["subjects"], labelled), weak, strong).to_dict()
        for key in ("router", "random", "subject_prior"):
            report[key].pop("shares", None)
            report[key].pop("qualities", None)
        # the thresholds the gateway applies: per predicted domain when the artifact has them
        by = metadata["thresholds"].get("by_domain") or {}
        bars = np.array([float(by.get(d, metadata["thresholds"]["escalation"])) for d, m in zip(predicted, mask) if m])
        up = out.escalation[mask] >= bars
        report["router"]["at_threshold"] = {"frontier_share": float(up.mean()),
                                            "quality_vs_frontier": float(np.where(up, strong, weak).mean() / strong.mean())}
    else:
        report["cost_quality"] = NO_CORRECTNESS if mask.sum() < 10 else "every labelled prompt has the same outcome on both models"
    return report


def threshold_for_rate(scores: np.ndarray, rate: float) -> float:
    """The threshold that sends about ``rate`` of this traffic to the frontier (score >= t),
    as RouteLLM calibrates: a quantile of scores on a sample of traffic."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("the escalation rate must be within [0, 1]")
    if rate == 0.0:
        return float(np.nextafter(scores.max(), np.inf))
    return float(np.quantile(scores, 1.0 - rate, method="higher"))


# A domain needs this many prompts in the sample for a threshold of its own.
MIN_DOMAIN_PROMPTS = 20


def thresholds_by_domain(scores: np.ndarray, predicted: Sequence[str], rate: float) -> dict[str, float]:
    """One threshold per predicted domain, each sending about ``rate`` of that domain's
    traffic to the frontier. The escalation heads learnt "needs the frontier" on exams,
    where technical subjects are the hard ones: calibrated globally on chat traffic, the
    threshold sent 54% of code prompts and 1% of general ones to the frontier (docs/ensemble.md).
    Domains with fewer than MIN_DOMAIN_PROMPTS prompts in the sample get none (the global
    threshold applies to them)."""
    out: dict[str, float] = {}
    for domain in sorted(set(predicted)):
        mask = np.array([p == domain for p in predicted])
        if mask.sum() >= MIN_DOMAIN_PROMPTS:
            out[domain] = threshold_for_rate(scores[mask], rate)
    return out


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
