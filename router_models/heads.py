"""The router's heads over a sentence embedding: pure numpy, the same at training and serving.

- subject head: multinomial logistic regression over MMLU subjects (plus ``gsm8k``) on the
  embedding; domain probabilities are its subject probabilities summed per domain, which
  keeps the domain consistent with the subject-to-domain mapping the labels come from;
- escalation: four estimators of how a request fares on the general and the frontier
  model, each read two ways, give eight standardised signals that are averaged and
  squashed to (0, 1). The estimators: per-subject training rates under the predicted
  subject distribution; two logistic heads and two small MLPs for P(general wrong) and
  P(frontier right) on the embedding plus cheap text features; and two gradient-boosted
  tree models for the same pair on the predicted subject probabilities plus the cheap
  features. The two readings: the *pair* P(general wrong) x P(frontier right), and the
  *gain* P(frontier right) - P(general right), the expected quality gained by escalating,
  which is what the cost-quality curve (APGR) adds up. Averaged over three validation
  splits the blend beat every subset tried (docs/router.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from router_models.features import CHEAP_FEATURES, with_features
from router_models.trees import tree_prob

# Column order of ``escalation_signals``; ``blend_stats`` holds a mean and a std per signal.
SIGNALS = ("prior_pair", "prior_gain", "lr_pair", "lr_gain", "mlp_pair", "mlp_gain", "gbt_pair", "gbt_gain")
GBT_PREFIXES = ("gbt_weak_wrong", "gbt_strong_right")


@dataclass(frozen=True)
class HeadOutputs:
    subject_probs: np.ndarray  # [n, subjects]
    domain_probs: np.ndarray  # [n, domains]
    escalation: np.ndarray  # [n], in (0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def mlp_prob(arrays: dict[str, np.ndarray], prefix: str, XF: np.ndarray) -> np.ndarray:
    hidden = np.maximum(XF @ arrays[f"{prefix}_W1"] + arrays[f"{prefix}_b1"], 0.0)
    return sigmoid(hidden @ arrays[f"{prefix}_W2"] + arrays[f"{prefix}_b2"][0])


def tree_inputs(subject_probs: np.ndarray, XF: np.ndarray) -> np.ndarray:
    """What the boosted trees see: the subject probabilities and the standardised cheap
    features (the last columns of ``XF``). Trees split on single coordinates, so 58
    meaningful probabilities suit them better than 384 embedding dimensions."""
    return np.hstack([subject_probs, XF[:, -len(CHEAP_FEATURES):]]).astype(np.float32)


def pair_and_gain(weak_wrong: np.ndarray, strong_right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(general wrong) x P(frontier right), and P(frontier right) - P(general right)."""
    return weak_wrong * strong_right, strong_right + weak_wrong - 1.0


def base_signals(arrays: dict[str, np.ndarray], XF: np.ndarray, subject_probs: np.ndarray) -> np.ndarray:
    """[n, 6] the prior, logistic and MLP signals (the first six of ``SIGNALS``)."""
    columns = [subject_probs @ arrays["subject_escalation"], subject_probs @ arrays["subject_gain"]]
    lr = (sigmoid(XF @ arrays["weak_wrong_w"] + arrays["weak_wrong_b"][0]), sigmoid(XF @ arrays["strong_right_w"] + arrays["strong_right_b"][0]))
    mlp = (mlp_prob(arrays, "mlp_weak_wrong", XF), mlp_prob(arrays, "mlp_strong_right", XF))
    for weak_wrong, strong_right in (lr, mlp):
        columns.extend(pair_and_gain(weak_wrong, strong_right))
    return np.stack(columns, axis=1)


def gbt_signals(arrays: dict[str, np.ndarray], T: np.ndarray) -> np.ndarray:
    """[n, 2] the boosted trees' pair and gain over ``tree_inputs``."""
    return np.stack(pair_and_gain(tree_prob(arrays, GBT_PREFIXES[0], T), tree_prob(arrays, GBT_PREFIXES[1], T)), axis=1)


def escalation_signals(arrays: dict[str, np.ndarray], XF: np.ndarray, subject_probs: np.ndarray) -> np.ndarray:
    """[n, len(SIGNALS)] raw signals, in ``SIGNALS`` order."""
    return np.hstack([base_signals(arrays, XF, subject_probs), gbt_signals(arrays, tree_inputs(subject_probs, XF))])


def blend(signals: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """The mean of the standardised signals, squashed; equal weights beat weights fitted on
    out-of-fold signals. ``stats`` = per-signal (mean, std) of the out-of-fold training
    signals, as [mean..., std...]."""
    k = signals.shape[1]
    z = (signals - stats[:k]) / stats[k:]
    return sigmoid(z.sum(axis=1) / k * 2.0)


def predict(arrays: dict[str, np.ndarray], X: np.ndarray, texts: Sequence[str]) -> HeadOutputs:
    subject_probs = softmax(X @ arrays["subject_W"] + arrays["subject_b"])
    domain_probs = subject_probs @ arrays["subject_domain"]
    XF = with_features(X, texts, arrays["cheap_mean"], arrays["cheap_std"])
    escalation = blend(escalation_signals(arrays, XF, subject_probs), arrays["blend_stats"])
    return HeadOutputs(subject_probs, domain_probs, escalation)
