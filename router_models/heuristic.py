"""A keyword heuristic router: the fallback when no trained artifact is configured.

Scores each domain by weighted keyword and pattern hits in the last user turn and turns the
scores into probabilities with a softmax, so its output has the same shape as the trained
router's. The escalation score grows with prompt length and signs of multi-step reasoning.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Sequence

from cluster.config import DOMAINS
from cluster.types import RouteQuery, RouteScores, as_query

log = logging.getLogger(__name__)

_PATTERNS: dict[str, tuple[tuple[str, float], ...]] = {
    "code": (
        (r"```", 3.0),
        (r"\b(python|javascript|typescript|java|rust|golang|c\+\+|sql|bash|regex|html|css)\b", 2.0),
        (r"\b(function|class|method|compile|bug|debug|stack trace|exception|api|algorithm|code|script|variable)\b", 1.5),
        (r"\b(def|import|return|async|await|lambda|struct)\b", 1.0),
        (r"[{};]\s*$|\w+\(\)", 0.5),
    ),
    "math": (
        (r"\b(solve|equation|integral|derivative|prove|theorem|probability|algebra|geometry|calculus|matrix)\b", 2.0),
        (r"\b(sum|product|how many|how much|percent|average|ratio|fraction|remainder|divisible)\b", 1.2),
        (r"\d+\s*[-+*/^=]\s*\d+", 2.0),
        (r"\$\d|\d+(\.\d+)?", 0.3),
    ),
    "legal": (
        (r"\b(law|legal|lawsuit|court|contract|tort|statute|plaintiff|defendant|liability|attorney|lawyer|constitution)\b", 2.0),
        (r"\b(rights|clause|jurisdiction|negligence|criminal|sue|regulation|compliance)\b", 1.2),
    ),
    "medical": (
        (r"\b(patient|symptom|diagnosis|disease|treatment|drug|dose|clinical|medical|doctor|infection|surgery|cancer)\b", 2.0),
        (r"\b(pain|fever|blood|heart|virus|vaccine|therapy|anatomy|physiology|pharmacology)\b", 1.2),
    ),
    "finance": (
        (r"\b(stock|bond|interest rate|inflation|portfolio|dividend|accounting|revenue|tax|investment|loan|mortgage)\b", 2.0),
        (r"\b(market|price|profit|asset|liability|equity|budget|gdp|economics|bank)\b", 1.0),
    ),
}
_COMPILED = {d: tuple((re.compile(p, re.IGNORECASE | re.MULTILINE), w) for p, w in pats) for d, pats in _PATTERNS.items()}
_GENERAL_PRIOR = 1.0  # the score "general" gets for free: with no hits, general wins
_TEMPERATURE = 1.0
_REASONING = re.compile(r"\b(why|explain|prove|step by step|compare|derive|analy[sz]e|design)\b", re.IGNORECASE)


def domain_scores(text: str) -> dict[str, float]:
    scores = {d: sum(w * len(rx.findall(text)) for rx, w in pats) for d, pats in _COMPILED.items()}
    scores["general"] = _GENERAL_PRIOR
    return scores


def softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    exp = {d: math.exp((s - top) / _TEMPERATURE) for d, s in scores.items()}
    total = sum(exp.values())
    return {d: exp[d] / total for d in DOMAINS}


def escalation_score(text: str) -> float:
    """0..1: long prompts with reasoning words look harder."""
    length = min(len(text) / 2000, 1.0)
    reasoning = min(len(_REASONING.findall(text)) / 3, 1.0)
    return round(0.6 * length + 0.4 * reasoning, 4)


class HeuristicRouter:
    name = "heuristic"

    def load(self) -> None:
        log.warning("router: using the keyword heuristic router (no trained artifact configured)")

    def score(self, batch: Sequence[str | RouteQuery]) -> list[RouteScores]:
        out = []
        for item in batch:
            text = as_query(item).request  # keywords of the request only
            probs = softmax(domain_scores(text))
            domain = max(probs, key=probs.__getitem__)
            out.append(RouteScores(domain=domain, domain_probs=probs, escalation_score=escalation_score(text)))
        return out
