"""The router's heads over a sentence embedding: pure numpy, the same at training and serving.

- subject head: multinomial logistic regression over MMLU subjects (plus ``gsm8k``) on the
  embedding; domain probabilities are its subject probabilities summed per domain, which
  keeps the domain consistent with the subject-to-domain mapping the labels come from;
- escalation: three standardised signals, averaged and squashed to (0, 1):
  the expected per-subject rate of "general model wrong and frontier right" under the
  predicted subject distribution; P(general wrong) x P(frontier right) from two logistic
  heads; and the same product from two small MLPs. The two pair heads see the embedding
  plus cheap text features. On validation data the blend beat each signal alone
  (docs/router.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from router_models.features import with_features


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


def escalation_signals(arrays: dict[str, np.ndarray], XF: np.ndarray, subject_probs: np.ndarray) -> np.ndarray:
    """[n, 3] raw signals: subject prior, logistic pair, MLP pair."""
    prior = subject_probs @ arrays["subject_escalation"]
    lr_pair = sigmoid(XF @ arrays["weak_wrong_w"] + arrays["weak_wrong_b"][0]) * sigmoid(XF @ arrays["strong_right_w"] + arrays["strong_right_b"][0])
    mlp_pair = mlp_prob(arrays, "mlp_weak_wrong", XF) * mlp_prob(arrays, "mlp_strong_right", XF)
    return np.stack([prior, lr_pair, mlp_pair], axis=1)


def blend(signals: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """``stats`` = per-signal (mean, std) on the training data, as [mean..., std...]."""
    k = signals.shape[1]
    z = (signals - stats[:k]) / stats[k:]
    return sigmoid(z.sum(axis=1) / k * 2.0)


def predict(arrays: dict[str, np.ndarray], X: np.ndarray, texts: Sequence[str]) -> HeadOutputs:
    subject_probs = softmax(X @ arrays["subject_W"] + arrays["subject_b"])
    domain_probs = subject_probs @ arrays["subject_domain"]
    XF = with_features(X, texts, arrays["cheap_mean"], arrays["cheap_std"])
    escalation = blend(escalation_signals(arrays, XF, subject_probs), arrays["blend_stats"])
    return HeadOutputs(subject_probs, domain_probs, escalation)
