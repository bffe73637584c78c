"""Train the router heads on embedded prompts and write a versioned artifact.

Logistic regressions (scikit-learn, lbfgs: deterministic for a fixed seed and data) over
the all-MiniLM-L6-v2 embedding. Hyper-parameters were chosen on the validation split; see
docs/router.md. scikit-learn is needed only here: serving runs the exported weights in numpy.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cluster.config import DOMAINS
from cluster.errors import InvalidRequestError
from router_models.artifact import RouterArtifact, load_artifact, save_artifact
from router_models.data import Example, file_sha256, read_many, split
from router_models.embedder import EMBEDDER_NAME, EMBEDDING_DIM, Embedder
from router_models.evaluate import evaluate_embedded, threshold_for_quality
from router_models.features import cheap_features, with_features
from router_models.heads import escalation_signals, softmax

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    validation_share: float = 0.2
    max_rows: int | None = None  # a deterministic subsample, for quick (CI) runs
    subject_C: float = 10.0
    binary_C: float = 1.0
    mlp_hidden: int = 64
    mlp_alpha: float = 1e-2
    target_quality: float = 0.95  # default threshold: reach this share of frontier-only quality


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


def _subject_tables(train: Sequence[Example], subjects: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """subject -> domain one-hot, and subject -> rate of (general wrong, frontier right)."""
    domain_of: dict[str, str] = {}
    for ex in train:
        if ex.subject and ex.domain:
            domain_of.setdefault(ex.subject, ex.domain)
    mapping = np.zeros((len(subjects), len(DOMAINS)), dtype=np.float32)
    for i, subject in enumerate(subjects):
        mapping[i, DOMAINS.index(domain_of.get(subject, "general"))] = 1.0
    labelled = [ex for ex in train if ex.has_correctness]
    overall = np.mean([(not ex.weak_correct) and ex.strong_correct for ex in labelled])
    rates = np.full(len(subjects), overall, dtype=np.float32)
    for i, subject in enumerate(subjects):
        ys = [(not ex.weak_correct) and ex.strong_correct for ex in labelled if ex.subject == subject]
        if ys:
            rates[i] = float(np.mean(ys))
    return mapping, rates


def fit_heads(train: Sequence[Example], X: np.ndarray, settings: TrainSettings) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every head; the arrays ``heads.predict`` reads."""
    subjects = sorted({ex.subject for ex in train if ex.subject})
    if len(subjects) < 2:
        raise InvalidRequestError("training needs examples of at least two subjects")
    has_subject = np.array([ex.subject is not None for ex in train])
    subject_model = _logreg(settings.subject_C, settings.seed).fit(X[has_subject], [ex.subject for ex in train if ex.subject])
    assert list(subject_model.classes_) == subjects
    if len(subjects) == 2:  # sklearn returns one row for two classes
        coef = np.vstack([-subject_model.coef_[0], subject_model.coef_[0]]) / 2
        intercept = np.array([-subject_model.intercept_[0], subject_model.intercept_[0]]) / 2
    else:
        coef, intercept = subject_model.coef_, subject_model.intercept_
    mapping, rates = _subject_tables(train, subjects)

    labelled = np.array([ex.has_correctness for ex in train])
    if labelled.sum() < 10:
        raise InvalidRequestError("training needs at least 10 examples with weak_correct and strong_correct labels")
    weak = np.array([bool(ex.weak_correct) for ex in train])[labelled]
    strong = np.array([bool(ex.strong_correct) for ex in train])[labelled]
    texts = [ex.prompt for ex, m in zip(train, labelled) if m]
    raw = cheap_features(texts)
    arrays: dict[str, np.ndarray] = {
        "subject_W": coef.T.astype(np.float32),
        "subject_b": intercept.astype(np.float32),
        "subject_domain": mapping,
        "subject_escalation": rates,
        "cheap_mean": raw.mean(axis=0),
        "cheap_std": raw.std(axis=0) + 1e-6,
    }
    XF = with_features(X[labelled], texts, arrays["cheap_mean"], arrays["cheap_std"])
    arrays["weak_wrong_w"], arrays["weak_wrong_b"] = _binary_head(XF, ~weak, settings.binary_C, settings.seed, "general-wrong")
    arrays["strong_right_w"], arrays["strong_right_b"] = _binary_head(XF, strong, settings.binary_C, settings.seed, "frontier-right")
    arrays.update(_mlp_head(XF, ~weak, settings, "mlp_weak_wrong"))
    arrays.update(_mlp_head(XF, strong, settings, "mlp_strong_right"))
    probs = softmax(X[labelled] @ arrays["subject_W"] + arrays["subject_b"])
    signals = escalation_signals(arrays, XF, probs)
    arrays["blend_stats"] = np.concatenate([signals.mean(axis=0), signals.std(axis=0) + 1e-9])
    return subjects, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def subsample(examples: list[Example], max_rows: int | None, seed: int) -> list[Example]:
    if max_rows is None or len(examples) <= max_rows:
        return examples
    keyed = sorted(examples, key=lambda ex: hashlib.sha256(f"sample:{seed}:{ex.prompt}".encode()).digest())
    return keyed[:max_rows]


def train(paths: Sequence[str | Path], out: str | Path, settings: TrainSettings = TrainSettings(), embedder: Embedder | None = None) -> RouterArtifact:
    paths = [Path(p) for p in paths]
    examples = subsample(read_many(paths), settings.max_rows, settings.seed)
    train_set, val_set = split(examples, settings.seed, settings.validation_share)
    embedder = (embedder or Embedder()).load()
    log.info("router train: embedding %d train and %d validation prompts", len(train_set), len(val_set))
    X_train = embedder.embed([ex.prompt for ex in train_set])
    X_val = embedder.embed([ex.prompt for ex in val_set])
    subjects, arrays = fit_heads(train_set, X_train, settings)

    metadata: dict[str, Any] = {
        "domains": list(DOMAINS),
        "subjects": subjects,
        "feature_dim": EMBEDDING_DIM,
        "mlp_hidden": settings.mlp_hidden,
        "embedder": {"name": EMBEDDER_NAME, "fingerprint": embedder.fingerprint, "max_tokens": embedder.max_tokens,
                     "dtype": embedder.dtype},
        "data": [{"path": p.name, "sha256": file_sha256(p)} for p in paths],
        "train": {"seed": settings.seed, "rows": len(train_set), "validation_rows": len(val_set),
                  "validation_share": settings.validation_share, "max_rows": settings.max_rows,
                  "subject_C": settings.subject_C, "binary_C": settings.binary_C,
                  "mlp_hidden": settings.mlp_hidden, "mlp_alpha": settings.mlp_alpha},
        "thresholds": {"escalation": 0.5, "calibrated": "default"},
    }
    report = evaluate_embedded(arrays, metadata, val_set, X_val)
    metadata["validation"] = report
    threshold = threshold_for_quality(arrays, val_set, X_val, settings.target_quality)
    if threshold is not None:
        metadata["thresholds"] = {"escalation": threshold, "calibrated": f"target_quality={settings.target_quality} on the validation split"}
    weights_digest = hashlib.sha256(b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))).hexdigest()[:12]
    metadata["version"] = f"router-{weights_digest}"
    save_artifact(Path(out), metadata, arrays)
    return load_artifact(out, expect_fingerprint=embedder.fingerprint)
