"""Fit the router's heads with scikit-learn and export them as the arrays ``heads`` reads.

scikit-learn is needed only here (imported inside the functions): serving runs the
exported weights in numpy. Every estimator is deterministic for a fixed seed and data
(lbfgs logistic regressions; MLPs and boosted trees with ``random_state``; no early
stopping in the trees). ``router_models.train`` combines them by cross-fitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cluster.config import DOMAINS
from cluster.errors import InvalidRequestError
from router_models.data import Example, is_chat
from router_models.features import cheap_features, with_features
from router_models.heads import GBT_PREFIXES
from router_models.trees import export_hgb


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    validation_share: float = 0.2
    max_rows: int | None = None  # a deterministic subsample, for quick (CI) runs
    subject_C: float = 10.0
    binary_C: float = 1.0
    mlp_hidden: int = 64
    mlp_alpha: float = 1e-2
    # Boosted trees; chosen by 5-fold cross-validation inside the seed-0 training part
    # (docs/router.md): smaller trees with a lower rate beat scikit-learn's defaults.
    gbt_iterations: int = 200
    gbt_learning_rate: float = 0.05
    gbt_leaves: int = 15
    gbt_l2: float = 1.0
    # Router window (router_models.embedder.window_ids): tokens kept from a long request's
    # start (None: its start only; the rest comes from its end) and the most tokens of
    # earlier user turns. Measured in docs/router.md (benchmarks/router_window.py): 64 + the
    # end routed long chat prompts best (0.888 against 0.880 for the start alone), and 128
    # context tokens lifted follow-up turns from 0.806 to 0.880.
    head_tokens: int | None = 64
    context_tokens: int = 128
    # Weight of a chat row in the subject head, against 1 for an MMLU or GSM8K row.
    chat_weight: float = 1.0
    # The embedder's top layers tuned for the subjects (router_models.tuning); 0: frozen.
    # All six: chat routing within noise of three (0.884 vs 0.889), and the escalation
    # heads kept their exam quality (APGR 0.702 vs 0.678; docs/router.md). Chat rows weigh
    # tune_chat_weight in that tuning: they are the hard, scarce part.
    tune_layers: int = 6
    tune_epochs: int = 2
    tune_layer_lr: float = 5e-5
    tune_chat_weight: float = 2.0
    folds: int = 5  # cross-fitting: out-of-fold inputs for the trees and the blend statistics
    target_quality: float = 0.95  # exam threshold: reach this share of frontier-only quality
    # With chat rows in training, the default threshold escalates this share of them
    # (train.choose_thresholds); None keeps the exam threshold.
    chat_escalation_rate: float | None = 0.2


def _logreg(C: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000, random_state=seed)


def _two_classes(y: np.ndarray, name: str) -> None:
    if y.all() or not y.any():
        raise InvalidRequestError(f"cannot train the {name} head: the training data has only one class")


def _binary_head(X: np.ndarray, y: np.ndarray, C: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    _two_classes(y, name)
    model = _logreg(C, seed).fit(X, y)
    return model.coef_[0].astype(np.float32), model.intercept_.astype(np.float32)


def _mlp_head(X: np.ndarray, y: np.ndarray, settings: TrainSettings, prefix: str) -> dict[str, np.ndarray]:
    from sklearn.neural_network import MLPClassifier

    _two_classes(y, prefix)
    # Early stopping needs a few validation rows of each class; tiny data sets skip it.
    early = len(y) >= 200
    model = MLPClassifier(hidden_layer_sizes=(settings.mlp_hidden,), alpha=settings.mlp_alpha, max_iter=200,
                          early_stopping=early, random_state=settings.seed).fit(X, y)
    return {f"{prefix}_W1": model.coefs_[0], f"{prefix}_b1": model.intercepts_[0],
            f"{prefix}_W2": model.coefs_[1][:, 0], f"{prefix}_b2": model.intercepts_[1]}


def _tree_head(T: np.ndarray, y: np.ndarray, settings: TrainSettings, prefix: str) -> dict[str, np.ndarray]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    _two_classes(y, prefix)
    model = HistGradientBoostingClassifier(
        max_iter=settings.gbt_iterations, learning_rate=settings.gbt_learning_rate, max_leaf_nodes=settings.gbt_leaves,
        l2_regularization=settings.gbt_l2, early_stopping=False, random_state=settings.seed,
    ).fit(T, y)
    return export_hgb(model, prefix)


def fit_trees(T: np.ndarray, weak: np.ndarray, strong: np.ndarray, settings: TrainSettings) -> dict[str, np.ndarray]:
    """The two boosted-tree heads (general wrong, frontier right) over ``tree_inputs`` rows."""
    return {**_tree_head(T, ~weak, settings, GBT_PREFIXES[0]), **_tree_head(T, strong, settings, GBT_PREFIXES[1])}


def _subject_tables(train: Sequence[Example], subjects: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """subject -> domain one-hot; subject -> rate of (general wrong, frontier right); and
    subject -> mean gain (frontier right - general right). Unseen: the overall figure."""
    domain_of: dict[str, str] = {}
    for ex in train:
        if ex.subject and ex.domain:
            domain_of.setdefault(ex.subject, ex.domain)
    mapping = np.zeros((len(subjects), len(DOMAINS)), dtype=np.float32)
    for i, subject in enumerate(subjects):
        mapping[i, DOMAINS.index(domain_of.get(subject, "general"))] = 1.0
    labelled = [ex for ex in train if ex.has_correctness]
    pair = np.array([(not ex.weak_correct) and ex.strong_correct for ex in labelled], dtype=np.float64)
    gain = np.array([float(bool(ex.strong_correct)) - float(bool(ex.weak_correct)) for ex in labelled])
    of = np.array([ex.subject for ex in labelled], dtype=object)
    rates = np.full(len(subjects), pair.mean(), dtype=np.float32)
    gains = np.full(len(subjects), gain.mean(), dtype=np.float32)
    for i, subject in enumerate(subjects):
        mine = of == subject
        if mine.any():
            rates[i], gains[i] = pair[mine].mean(), gain[mine].mean()
    return mapping, rates, gains


def labelled_outcomes(train: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of examples with both correctness labels, and their (general, frontier) correctness."""
    labelled = np.array([ex.has_correctness for ex in train], dtype=bool)
    weak = np.array([bool(ex.weak_correct) for ex in train], dtype=bool)[labelled]
    strong = np.array([bool(ex.strong_correct) for ex in train], dtype=bool)[labelled]
    return labelled, weak, strong


def fit_base(train: Sequence[Example], X: np.ndarray, settings: TrainSettings) -> tuple[list[str], dict[str, np.ndarray]]:
    """The subject head, the subject tables, the cheap-feature scaling and the logistic and
    MLP pair heads: everything but the trees and the blend statistics."""
    subjects = sorted({ex.subject for ex in train if ex.subject})
    if len(subjects) < 2:
        raise InvalidRequestError("training needs examples of at least two subjects")
    has_subject = np.array([ex.subject is not None for ex in train])
    weights = np.array([settings.chat_weight if is_chat(ex) else 1.0 for ex in train if ex.subject])
    subject_model = _logreg(settings.subject_C, settings.seed).fit(X[has_subject], [ex.subject for ex in train if ex.subject],
                                                                   sample_weight=weights)
    assert list(subject_model.classes_) == subjects
    if len(subjects) == 2:  # sklearn returns one row for two classes
        coef = np.vstack([-subject_model.coef_[0], subject_model.coef_[0]]) / 2
        intercept = np.array([-subject_model.intercept_[0], subject_model.intercept_[0]]) / 2
    else:
        coef, intercept = subject_model.coef_, subject_model.intercept_
    mapping, rates, gains = _subject_tables(train, subjects)

    labelled, weak, strong = labelled_outcomes(train)
    texts = [ex.prompt for ex, m in zip(train, labelled) if m]
    raw = cheap_features(texts)
    arrays: dict[str, np.ndarray] = {
        "subject_W": coef.T.astype(np.float32),
        "subject_b": intercept.astype(np.float32),
        "subject_domain": mapping,
        "subject_escalation": rates,
        "subject_gain": gains,
        "cheap_mean": raw.mean(axis=0),
        "cheap_std": raw.std(axis=0) + 1e-6,
    }
    XF = with_features(X[labelled], texts, arrays["cheap_mean"], arrays["cheap_std"])
    arrays["weak_wrong_w"], arrays["weak_wrong_b"] = _binary_head(XF, ~weak, settings.binary_C, settings.seed, "general-wrong")
    arrays["strong_right_w"], arrays["strong_right_b"] = _binary_head(XF, strong, settings.binary_C, settings.seed, "frontier-right")
    arrays.update(_mlp_head(XF, ~weak, settings, "mlp_weak_wrong"))
    arrays.update(_mlp_head(XF, strong, settings, "mlp_strong_right"))
    return subjects, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
