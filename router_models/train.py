"""Train the router heads on embedded prompts and write a versioned artifact.

The heads (``router_models.fitting``: logistic regressions, MLPs and boosted trees over the
all-MiniLM-L6-v2 embedding) are combined by cross-fitting here. Training is deterministic
for a fixed seed and data. Hyper-parameters were chosen on the validation split or by
cross-validation inside the training part; see docs/router.md. scikit-learn is needed
only for training: serving runs the exported weights in numpy.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cluster.config import DOMAINS
from cluster.errors import InvalidRequestError
from router_models.artifact import RouterArtifact, load_artifact, save_artifact
from router_models.data import Example, file_sha256, is_chat, read_many, split
from router_models.embedder import EMBEDDER_NAME, EMBEDDING_DIM, Embedder
from router_models.evaluate import evaluate_embedded, threshold_for_quality, threshold_for_rate, thresholds_by_domain
from router_models.features import with_features
from router_models.fitting import TrainSettings, fit_base, fit_trees, labelled_outcomes
from router_models.heads import GBT_PREFIXES, SIGNALS, base_signals, gbt_signals, predict, softmax, tree_inputs
from router_models.trees import average_ensembles

log = logging.getLogger(__name__)


def fold_of(prompt: str, seed: int, folds: int) -> int:
    """A prompt's cross-fitting fold: a hash of (seed, prompt), like the validation split,
    so it does not depend on file order and repeated prompts share a fold."""
    digest = hashlib.sha256(f"fold:{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def _fold_outputs(train: Sequence[Example], X: np.ndarray, keep: np.ndarray, rows: np.ndarray, subjects: list[str],
                  settings: TrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """Subject probabilities (in ``subjects`` columns) and base signals for ``rows``, from
    heads fitted on the ``keep`` examples only."""
    fold_subjects, arrays = fit_base([ex for ex, k in zip(train, keep) if k], X[keep], settings)
    local = softmax(X[rows] @ arrays["subject_W"] + arrays["subject_b"])
    texts = [train[i].prompt for i in rows]
    signals = base_signals(arrays, with_features(X[rows], texts, arrays["cheap_mean"], arrays["cheap_std"]), local)
    probs = np.zeros((len(rows), len(subjects)), dtype=np.float32)
    probs[:, [subjects.index(s) for s in fold_subjects]] = local  # a subject a fold lacks keeps 0
    return probs, signals


def fit_heads(train: Sequence[Example], X: np.ndarray, settings: TrainSettings) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every head; the arrays ``heads.predict`` reads.

    Cross-fitting: each labelled example also gets subject probabilities and signals from
    heads fitted without its fold. The trees learn from those out-of-fold probabilities,
    because in-sample ones are overconfident (the subject head fits its own training rows
    far better than new prompts; trees alone scored 0.644 APGR fitted on in-sample and
    0.659 on out-of-fold probabilities, mean of seeds 0-2), and the blend statistics are
    taken over out-of-fold signals, so each signal is scaled as it behaves on unseen
    prompts. Needs ``10 * folds`` labelled examples.
    """
    labelled, weak, strong = labelled_outcomes(train)
    if labelled.sum() < 10 * settings.folds:
        raise InvalidRequestError(f"training needs at least {10 * settings.folds} examples with weak_correct and strong_correct labels")
    subjects, arrays = fit_base(train, X, settings)
    fold = np.array([fold_of(ex.prompt, settings.seed, settings.folds) for ex in train])
    rows = np.flatnonzero(labelled)
    oof_probs = np.zeros((len(rows), len(subjects)), dtype=np.float32)
    oof_signals = np.zeros((len(rows), len(SIGNALS)))
    for k in range(settings.folds):
        held = fold[rows] == k
        oof_probs[held], oof_signals[held, :6] = _fold_outputs(train, X, fold != k, rows[held], subjects, settings)
    texts = [train[i].prompt for i in rows]
    T = tree_inputs(oof_probs, with_features(X[rows], texts, arrays["cheap_mean"], arrays["cheap_std"]))
    # The served trees are the fold models averaged (in logit space): bagging cut the spread
    # of validation APGR under bf16-sized embedding noise from 0.003 to 0.001 (seed 0),
    # raised its mean a little, and saves a sixth fit.
    fold_trees = []
    for k in range(settings.folds):
        held = fold[rows] == k
        fold_trees.append(fit_trees(T[~held], weak[~held], strong[~held], settings))
        oof_signals[held, 6:] = gbt_signals(fold_trees[-1], T[held])
    for prefix in GBT_PREFIXES:
        arrays.update(average_ensembles(fold_trees, prefix))
    arrays["blend_stats"] = np.concatenate([oof_signals.mean(axis=0), oof_signals.std(axis=0) + 1e-9]).astype(np.float32)
    return subjects, arrays


def subsample(examples: list[Example], max_rows: int | None, seed: int) -> list[Example]:
    if max_rows is None or len(examples) <= max_rows:
        return examples
    keyed = sorted(examples, key=lambda ex: hashlib.sha256(f"sample:{seed}:{ex.prompt}".encode()).digest())
    return keyed[:max_rows]


def choose_thresholds(arrays: dict[str, np.ndarray], train_set: Sequence[Example], X_train: np.ndarray, val_set: Sequence[Example],
                      X_val: np.ndarray, settings: TrainSettings) -> dict[str, Any]:
    """The default escalation threshold, and how it was chosen.

    Exams (correctness labels): the cheapest threshold reaching ``target_quality`` of
    frontier-only quality on the validation split. Chat prompts have no correctness labels,
    and the heads learnt "needs the frontier" on MMLU only: on chat prompts their scores
    run higher, and the exam threshold would escalate 44.5% of chat prompts with the
    shipped artifact (73.9% with three tuned layers; docs/router.md). With chat rows in training, the default is therefore the threshold
    that escalates ``chat_escalation_rate`` of the chat training prompts (RouteLLM's
    calibration on a sample of traffic); the exam threshold is kept beside it. Operators
    recalibrate on their own traffic with ``slmctl router calibrate [--per-domain]``.
    """
    exam = threshold_for_quality(arrays, val_set, X_val, settings.target_quality)
    out: dict[str, Any] = {"escalation": 0.5 if exam is None else exam,
                           "calibrated": "default" if exam is None else f"target_quality={settings.target_quality} on the validation split"}
    if exam is not None:
        out["exam_quality_threshold"] = exam
    chat = np.array([is_chat(ex) for ex in train_set])
    if settings.chat_escalation_rate is not None and chat.sum() >= 10:
        texts = [ex.prompt for ex, c in zip(train_set, chat) if c]
        heads = predict(arrays, X_train[chat], texts)
        out["escalation"] = threshold_for_rate(heads.escalation, settings.chat_escalation_rate)
        # and per predicted domain: the global threshold would escalate code far more than
        # general (the heads learnt "hard" from exam subjects); see thresholds_by_domain
        predicted = [DOMAINS[i] for i in heads.domain_probs.argmax(axis=1)]
        out["by_domain"] = thresholds_by_domain(heads.escalation, predicted, settings.chat_escalation_rate)
        out["calibrated"] = (f"target_escalation_rate={settings.chat_escalation_rate} on the chat training prompts "
                             f"({int(chat.sum())}), overall and per predicted domain")
    return out


def train(paths: Sequence[str | Path], out: str | Path, settings: TrainSettings = TrainSettings(), embedder: Embedder | None = None) -> RouterArtifact:
    paths = [Path(p) for p in paths]
    examples = subsample(read_many(paths), settings.max_rows, settings.seed)
    train_set, val_set = split(examples, settings.seed, settings.validation_share)
    embedder = (embedder or Embedder(head_tokens=settings.head_tokens, context_tokens=settings.context_tokens)).load()
    tuned: dict[str, np.ndarray] = {}
    if settings.tune_layers:
        from router_models.tuning import TuneSettings, tune_embedder

        log.info("router train: tuning the embedder's top %d layers on %d prompts", settings.tune_layers, len(train_set))
        tune = TuneSettings(layers=settings.tune_layers, epochs=settings.tune_epochs, layer_lr=settings.tune_layer_lr, seed=settings.seed)
        tuned = tune_embedder(embedder, train_set, tune, settings.tune_chat_weight)
    log.info("router train: embedding %d train and %d validation prompts", len(train_set), len(val_set))
    X_train = embedder.embed([ex.prompt for ex in train_set])
    X_val = embedder.embed([ex.prompt for ex in val_set])
    subjects, arrays = fit_heads(train_set, X_train, settings)
    arrays.update(tuned)

    metadata: dict[str, Any] = {
        "domains": list(DOMAINS),
        "subjects": subjects,
        "feature_dim": EMBEDDING_DIM,
        "mlp_hidden": settings.mlp_hidden,
        "embedder": {"name": EMBEDDER_NAME, "fingerprint": embedder.fingerprint, "max_tokens": embedder.max_tokens,
                     "head_tokens": embedder.head_tokens, "context_tokens": embedder.context_tokens, "dtype": embedder.dtype,
                     "compute": embedder.compute, "tuned_layers": settings.tune_layers if tuned else 0},
        "data": [{"path": p.name, "sha256": file_sha256(p)} for p in paths],
        "train": {"seed": settings.seed, "rows": len(train_set), "validation_rows": len(val_set),
                  "validation_share": settings.validation_share, "max_rows": settings.max_rows,
                  "subject_C": settings.subject_C, "binary_C": settings.binary_C,
                  "mlp_hidden": settings.mlp_hidden, "mlp_alpha": settings.mlp_alpha,
                  "gbt_iterations": settings.gbt_iterations, "gbt_learning_rate": settings.gbt_learning_rate,
                  "gbt_leaves": settings.gbt_leaves, "gbt_l2": settings.gbt_l2, "folds": settings.folds,
                  "chat_weight": settings.chat_weight, "tune_layers": settings.tune_layers, "tune_epochs": settings.tune_epochs,
                  "tune_layer_lr": settings.tune_layer_lr, "tune_chat_weight": settings.tune_chat_weight,
                  "chat_escalation_rate": settings.chat_escalation_rate, "target_quality": settings.target_quality},
    }
    metadata["thresholds"] = choose_thresholds(arrays, train_set, X_train, val_set, X_val, settings)
    metadata["validation"] = evaluate_embedded(arrays, metadata, val_set, X_val)
    weights_digest = hashlib.sha256(b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))).hexdigest()[:12]
    metadata["version"] = f"router-{weights_digest}"
    save_artifact(Path(out), metadata, arrays)
    return load_artifact(out, expect_fingerprint=embedder.fingerprint)
