"""The quality gate: a pure score of a small model's answer from what the engine returned.

Three signals, all free (every engine here returns token logprobs):
- the mean token probability, ``exp(mean logprob)`` (the geometric mean of the tokens'
  probabilities);
- a low quantile of the token probabilities (the 10th percentile by default; 0 reads the
  minimum). Gupta et al. (ICLR 2024, "Language Model Cascades: Token-level uncertainty and
  beyond") found quantiles of token uncertainty defer better than the mean, because one
  unsure token can sink an answer that is otherwise fluent;
- the answer's length: a finished answer shorter than ``min_answer_tokens`` is scaled
  down in proportion.

The score is the weighted mean of the two probabilities times the length factor, in
[0, 1]; an answer passes when its score reaches ``pass_bar``. An answer without logprobs
scores 0: the gate cannot vouch for it, so it escalates (documented in docs/ensemble.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from cluster.config import GateConfig
from cluster.errors import InvalidRequestError


@dataclass(frozen=True)
class GateFeatures:
    tokens: int
    mean_logprob: float | None  # None when the engine returned no logprobs
    low_prob: float | None
    finished: bool = True  # False when the gate decides on a prefix

    def as_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "mean_logprob": self.mean_logprob, "low_prob": self.low_prob, "finished": self.finished}


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of nothing")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def features(logprobs: Sequence[float], tokens: int, *, q: float, finished: bool = True) -> GateFeatures:
    """Gate features of an answer: its token logprobs (may be empty) and token count."""
    if not logprobs:
        return GateFeatures(tokens=tokens, mean_logprob=None, low_prob=None, finished=finished)
    probs = sorted(math.exp(min(0.0, lp)) for lp in logprobs)
    mean = sum(min(0.0, lp) for lp in logprobs) / len(logprobs)
    return GateFeatures(tokens=tokens, mean_logprob=mean, low_prob=quantile(probs, q), finished=finished)


def score(f: GateFeatures, cfg: GateConfig) -> float:
    if f.mean_logprob is None or f.low_prob is None:
        return 0.0
    mean_prob = math.exp(f.mean_logprob)
    value = (cfg.mean_weight * mean_prob + cfg.low_weight * f.low_prob) / (cfg.mean_weight + cfg.low_weight)
    if f.finished and f.tokens < cfg.min_answer_tokens:
        value *= f.tokens / cfg.min_answer_tokens
    return min(1.0, max(0.0, value))


def passes(value: float, bar: float) -> bool:
    return value >= bar


# --- calibration (`slmctl gate calibrate`) -------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    bar: float
    escalation_rate: float  # share of the records that would escalate (score < bar)
    quality: float  # share correct among the answers that pass
    records: int


def record_features(record: Mapping[str, object], where: object) -> tuple[GateFeatures, bool]:
    """One labelled record ``{"features": {...}, "correct": bool}``; InvalidRequestError
    names ``where`` it came from (a file:line)."""
    feats = record.get("features")
    correct = record.get("correct")
    if not isinstance(feats, Mapping) or not isinstance(correct, bool):
        raise InvalidRequestError(f"{where}: need {{'features': {{...}}, 'correct': true|false}}", param="data")
    try:
        tokens = int(feats["tokens"])  # type: ignore[arg-type]
        mean = feats.get("mean_logprob")
        low = feats.get("low_prob")
        return (
            GateFeatures(
                tokens=tokens,
                mean_logprob=None if mean is None else float(mean),  # type: ignore[arg-type]
                low_prob=None if low is None else float(low),  # type: ignore[arg-type]
                finished=bool(feats.get("finished", True)),
            ),
            correct,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{where}: bad features ({exc}); need tokens, mean_logprob, low_prob", param="data") from None


def calibrate(
    scored: Iterable[tuple[float, bool]],
    *,
    target_escalation_rate: float | None = None,
    target_quality: float | None = None,
) -> Calibration:
    """The pass bar for a target, from (gate score, correct) pairs.

    - ``target_escalation_rate`` R: the bar below which a share R of the records falls (as
      RouteLLM calibrates its threshold on a sample of traffic).
    - ``target_quality`` Q: the lowest bar at which the answers that pass are correct at
      least a share Q of the time (the fewest escalations that keep that quality); 1.0
      (only perfect scores pass) when no bar reaches it.
    """
    pairs = sorted(scored)
    if not pairs:
        raise InvalidRequestError("no records to calibrate on", param="data")
    if (target_escalation_rate is None) == (target_quality is None):
        raise InvalidRequestError("give exactly one of target_escalation_rate and target_quality")
    n = len(pairs)
    scores = [s for s, _ in pairs]
    if target_escalation_rate is not None:
        k = min(n, max(0, round(target_escalation_rate * n)))
        bar = 0.0 if k == 0 else (scores[k - 1] + scores[k]) / 2 if k < n else min(1.0, scores[-1] + 1e-9)
        return _summary(pairs, bar)
    # Walk the bar up through the distinct scores; passing = the records at or above it.
    correct_above = sum(c for _, c in pairs)
    for i in range(n):
        if i == 0 or scores[i] != scores[i - 1]:
            if correct_above / (n - i) >= target_quality:  # type: ignore[operator]
                return _summary(pairs, scores[i])
        correct_above -= pairs[i][1]
    return _summary(pairs, 1.0)


def _summary(pairs: Sequence[tuple[float, bool]], bar: float) -> Calibration:
    passing = [c for s, c in pairs if s >= bar]
    return Calibration(
        bar=round(bar, 6),
        escalation_rate=1 - len(passing) / len(pairs),
        quality=(sum(passing) / len(passing)) if passing else 1.0,
        records=len(pairs),
    )
