"""Gradient-boosted trees as plain numpy arrays: export from scikit-learn, predict, validate.

The artifact stays numpy-only and pickle-free, so a fitted ``HistGradientBoostingClassifier``
(binary) is flattened into a handful of arrays under a name prefix:

- ``{prefix}_feature`` int32 [nodes]: the feature a node splits on (0 at leaves);
- ``{prefix}_threshold`` float32 [nodes]: go left when ``x <= threshold``;
- ``{prefix}_missing_left`` int32 [nodes]: 1 when a NaN goes left;
- ``{prefix}_left``, ``{prefix}_right`` int32 [nodes]: children as indices into the flat
  arrays; a leaf points to itself on both sides, which lets every row walk the same
  number of steps without branching;
- ``{prefix}_value`` float32 [nodes]: the leaf's raw score (unused at inner nodes);
- ``{prefix}_roots`` int32 [trees]: each tree's root;
- ``{prefix}_baseline`` float32 [1]: the raw score before any tree.

The raw score is ``baseline + sum of the reached leaves' values``; the probability of the
positive class is its logistic sigmoid, as scikit-learn computes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NODE_FIELDS = ("feature", "threshold", "missing_left", "left", "right", "value")
INT_FIELDS = ("feature", "missing_left", "left", "right", "roots")
TREE_FIELDS = (*NODE_FIELDS, "roots", "baseline")


def tree_array_names(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{field}" for field in TREE_FIELDS)


def _threshold_float32(threshold: np.ndarray) -> np.ndarray:
    """Thresholds rounded *down* to float32. The inputs are float32, and for a float32 x,
    ``x <= t`` holds exactly when ``x <= (largest float32 <= t)``; rounding to nearest
    instead could send a value lying just above a float64 threshold to the wrong side.
    +inf (scikit-learn's "split on NaN only") becomes the largest float32, which every
    finite x is below, so the artifact holds no infinities."""
    t = np.minimum(threshold.astype(np.float64), np.finfo(np.float32).max)
    t32 = t.astype(np.float32)
    return np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32).astype(np.float32)


def export_hgb(model: Any, prefix: str) -> dict[str, np.ndarray]:
    """Flatten a fitted binary ``HistGradientBoostingClassifier`` (numeric features only).

    Reads scikit-learn's private ``_predictors`` and ``_baseline_prediction``; the unit
    tests check the result against ``predict_proba``, so a scikit-learn release that moves
    them fails there rather than at serving.
    """
    if len(getattr(model, "classes_", ())) != 2:
        raise ValueError("export_hgb supports binary classifiers only")
    parts: dict[str, list[np.ndarray]] = {field: [] for field in NODE_FIELDS}
    roots: list[int] = []
    offset = 0
    for (predictor,) in model._predictors:  # one predictor per iteration for a binary model
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits are not supported")
        n = len(nodes)
        leaf = nodes["is_leaf"].astype(bool)
        own = np.arange(offset, offset + n, dtype=np.int64)
        parts["feature"].append(np.where(leaf, 0, nodes["feature_idx"]))
        parts["threshold"].append(np.where(leaf, 0.0, nodes["num_threshold"]))
        parts["missing_left"].append(np.where(leaf, 0, nodes["missing_go_to_left"]))
        parts["left"].append(np.where(leaf, own, nodes["left"].astype(np.int64) + offset))
        parts["right"].append(np.where(leaf, own, nodes["right"].astype(np.int64) + offset))
        parts["value"].append(np.where(leaf, nodes["value"], 0.0))
        roots.append(offset)
        offset += n
    flat = {field: np.concatenate(values) for field, values in parts.items()}
    out = {f"{prefix}_{field}": flat[field].astype(np.int32) for field in ("feature", "missing_left", "left", "right")}
    out[f"{prefix}_threshold"] = _threshold_float32(flat["threshold"])
    out[f"{prefix}_value"] = flat["value"].astype(np.float32)
    out[f"{prefix}_roots"] = np.asarray(roots, dtype=np.int32)
    out[f"{prefix}_baseline"] = np.asarray(model._baseline_prediction, dtype=np.float32).reshape(1)
    problem = tree_problems(out, prefix, int(model.n_features_in_))
    if problem:
        raise ValueError(f"exported trees are malformed: {problem}")
    return out


def average_ensembles(parts: list[dict[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    """One ensemble whose raw score is the mean of the parts' raw scores: their trees side
    by side, leaf values and baselines divided by the number of parts (bagging in logit
    space, in the same array format)."""
    if not parts:
        raise ValueError("nothing to average")
    k = len(parts)
    offsets = np.cumsum([0] + [len(p[f"{prefix}_feature"]) for p in parts[:-1]])
    out = {f"{prefix}_{field}": np.concatenate([p[f"{prefix}_{field}"] for p in parts]) for field in ("feature", "threshold", "missing_left")}
    for field in ("left", "right", "roots"):
        out[f"{prefix}_{field}"] = np.concatenate([p[f"{prefix}_{field}"] + off for p, off in zip(parts, offsets)]).astype(np.int32)
    out[f"{prefix}_value"] = (np.concatenate([p[f"{prefix}_value"] for p in parts]) / k).astype(np.float32)
    out[f"{prefix}_baseline"] = np.mean([p[f"{prefix}_baseline"] for p in parts], axis=0).astype(np.float32)
    return out


def tree_raw(arrays: dict[str, np.ndarray], prefix: str, X: np.ndarray) -> np.ndarray:
    """[n] raw scores for float32 inputs ``X`` [n, features]. Every (row, tree) pair walks
    down one level per step, all pairs at once; pairs that reached a leaf drop out of the
    working set, since most trees are far shallower than the deepest."""
    X = np.asarray(X, dtype=np.float32)
    feature, threshold = arrays[f"{prefix}_feature"], arrays[f"{prefix}_threshold"]
    missing_left = arrays[f"{prefix}_missing_left"].astype(bool)
    left, right, roots = arrays[f"{prefix}_left"], arrays[f"{prefix}_right"], arrays[f"{prefix}_roots"]
    node = np.tile(roots, len(X))  # row-major (row, tree) pairs
    row = np.repeat(np.arange(len(X)), len(roots))
    active = np.arange(len(node))
    # Validated trees have children after their parents, so every walk ends within len(feature) steps.
    for _ in range(len(feature)):
        if not len(active):
            break
        at = node[active]
        x = X[row[active], feature[at]]
        go_left = np.where(np.isnan(x), missing_left[at], x <= threshold[at])
        step = np.where(go_left, left[at], right[at])
        node[active] = step
        active = active[step != at]  # a leaf is its own child
    leaves = arrays[f"{prefix}_value"][node].reshape(len(X), len(roots))
    return arrays[f"{prefix}_baseline"][0] + leaves.sum(axis=1, dtype=np.float64)


def tree_prob(arrays: dict[str, np.ndarray], prefix: str, X: np.ndarray) -> np.ndarray:
    """[n] probability of the positive class, as ``predict_proba(X)[:, 1]``."""
    return 1.0 / (1.0 + np.exp(-np.clip(tree_raw(arrays, prefix, X), -60, 60)))


def tree_problems(arrays: dict[str, np.ndarray], prefix: str, n_features: int) -> str | None:
    """What is wrong with a prefix's tree arrays, or None. Checks what ``tree_raw`` relies
    on to index safely and to stop: shapes, integer dtypes, features in range, leaves
    pointing to themselves and inner nodes' children after them within the arrays."""
    names = {field: f"{prefix}_{field}" for field in TREE_FIELDS}
    missing = [name for name in names.values() if name not in arrays]
    if missing:
        return f"lacks {missing}"
    a = {field: np.asarray(arrays[name]) for field, name in names.items()}
    n = len(a["feature"]) if a["feature"].ndim == 1 else -1
    if n < 1 or any(a[field].shape != (n,) for field in NODE_FIELDS):
        return f"{prefix} node arrays must be 1-D, non-empty and of one length"
    if a["roots"].ndim != 1 or len(a["roots"]) < 1 or a["baseline"].shape != (1,):
        return f"{prefix}_roots must be 1-D and non-empty and {prefix}_baseline of shape (1,)"
    for field in INT_FIELDS:
        if not np.issubdtype(a[field].dtype, np.integer):
            return f"{names[field]} must hold integers, not {a[field].dtype}"
    for field in ("threshold", "value", "baseline"):
        if not np.all(np.isfinite(a[field])):
            return f"{names[field]} holds NaN or infinite values"
    own = np.arange(n)
    if a["feature"].min() < 0 or a["feature"].max() >= n_features:
        return f"{names['feature']} is outside [0, {n_features})"
    if not np.isin(a["missing_left"], (0, 1)).all():
        return f"{names['missing_left']} must be 0 or 1"
    if a["roots"].min() < 0 or a["roots"].max() >= n:
        return f"{names['roots']} points outside the nodes"
    leaf = a["left"] == own
    if not np.array_equal(a["right"][leaf], own[leaf]):
        return f"{prefix}: a leaf (left child is itself) must have itself as right child too"
    for side in ("left", "right"):
        child = a[side][~leaf]
        if ((child <= own[~leaf]) | (child >= n)).any():
            return f"{names[side]} must point after its node and inside the arrays"
    return None
