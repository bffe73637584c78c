"""Cheap text features that join the embedding for the escalation heads.

On validation data, length, digit and operator density, line count and LaTeX/currency
markers added about +0.01 APGR to the escalation heads (docs/router.md); the embedding
alone misses how formula-heavy a prompt is.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

CHEAP_FEATURES = ("log_chars", "digit_share", "operator_density", "lines", "latex_or_currency")
_OPERATORS = re.compile(r"[=+\-*/^]")
_LATEX = re.compile(r"\\|\$")


def cheap_features(texts: Sequence[str]) -> np.ndarray:
    rows = []
    for text in texts:
        n = max(1, len(text))
        rows.append(
            [
                np.log1p(len(text)),
                sum(c.isdigit() for c in text) / n,
                len(_OPERATORS.findall(text)) / n * 10,
                text.count("\n"),
                float(bool(_LATEX.search(text))),
            ]
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(CHEAP_FEATURES))


def with_features(X: np.ndarray, texts: Sequence[str], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The embedding with the standardised cheap features appended."""
    return np.hstack([X, (cheap_features(texts) - mean) / std]).astype(np.float32)
