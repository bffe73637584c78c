"""Boosted trees exported to numpy (router_models.trees) predict exactly as scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from router_models.trees import average_ensembles, export_hgb, tree_array_names, tree_prob, tree_problems, tree_raw


def _fit(X: np.ndarray, y: np.ndarray, **params) -> HistGradientBoostingClassifier:
    settings = dict(max_iter=60, learning_rate=0.1, max_leaf_nodes=15, early_stopping=False, random_state=0)
    return HistGradientBoostingClassifier(**(settings | params)).fit(X, y)


def test_numpy_trees_equal_sklearn_on_data_with_missing_values() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 12)).astype(np.float32)
    X[:, 3] = rng.integers(0, 4, size=2000)  # a discrete feature: many values sit exactly on a threshold's side
    y = X[:, 0] + X[:, 1] * X[:, 2] + 0.5 * X[:, 3] + rng.normal(size=2000) > 0.8
    X[rng.random(X.shape) < 0.05] = np.nan  # some NaNs, so splits learn where missing values go
    model = _fit(X, y)
    arrays = export_hgb(model, "g")
    assert set(arrays) == set(tree_array_names("g"))
    assert len(arrays["g_roots"]) == 60 and arrays["g_left"].dtype == np.int32

    X_new = rng.normal(size=(500, 12)).astype(np.float32)
    X_new[:, 3] = rng.integers(0, 4, size=500)
    X_new[rng.random(X_new.shape) < 0.05] = np.nan
    for data in (X, X_new):
        np.testing.assert_allclose(tree_raw(arrays, "g", data), model._raw_predict(data)[:, 0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(tree_prob(arrays, "g", data), model.predict_proba(data)[:, 1], rtol=0, atol=1e-6)
    assert tree_prob(arrays, "g", X[:0]).shape == (0,)


def test_thresholds_between_adjacent_float32_values_keep_their_side() -> None:
    # Two neighbouring float32 values: scikit-learn splits at their float64 midpoint, which
    # rounds to the upper one in float32; the export must round it down instead.
    low = np.nextafter(np.float32(1.0), np.float32(2.0))
    high = np.nextafter(low, np.float32(2.0))
    assert np.float32((np.float64(low) + np.float64(high)) / 2) == high  # the trap is real
    X = np.array([[low], [high]] * 200, dtype=np.float32)
    y = np.array([False, True] * 200)
    model = _fit(X, y, max_iter=5, min_samples_leaf=5)
    arrays = export_hgb(model, "g")
    np.testing.assert_allclose(tree_prob(arrays, "g", X), model.predict_proba(X)[:, 1], atol=1e-6)
    assert tree_prob(arrays, "g", X[:1])[0] < 0.5 < tree_prob(arrays, "g", X[1:2])[0]


def test_export_refuses_a_multiclass_model() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="binary"):
        export_hgb(_fit(X, rng.integers(0, 3, size=300), max_iter=3), "g")


def stump() -> dict[str, np.ndarray]:
    """One tree: node 0 splits feature 1 at 0.5 (NaN goes left) into leaves 1 and 2."""
    return {
        "t_feature": np.array([1, 0, 0], np.int32),
        "t_threshold": np.array([0.5, 0, 0], np.float32),
        "t_missing_left": np.array([1, 0, 0], np.int32),
        "t_left": np.array([1, 1, 2], np.int32),
        "t_right": np.array([2, 1, 2], np.int32),
        "t_value": np.array([0, -0.25, 0.75], np.float32),
        "t_roots": np.array([0], np.int32),
        "t_baseline": np.array([0.1], np.float32),
    }


def test_a_hand_built_stump() -> None:
    X = np.array([[9, 0.5], [9, 0.6], [9, np.nan]], dtype=np.float32)
    np.testing.assert_allclose(tree_raw(stump(), "t", X), [-0.15, 0.85, -0.15], atol=1e-7)
    assert tree_problems(stump(), "t", n_features=2) is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"t_left": np.array([0, 1, 2], np.int32)}, "a leaf"),  # the root a leaf on one side only
        ({"t_right": np.array([0, 1, 2], np.int32)}, "must point after its node"),  # a loop back to the root
        ({"t_right": np.array([3, 1, 2], np.int32)}, "must point after its node and inside"),
        ({"t_feature": np.array([2, 0, 0], np.int32)}, "outside [0, 2)"),
        ({"t_left": np.array([1.0, 1, 2], np.float32)}, "must hold integers"),
        ({"t_value": np.array([0, 1], np.float32)}, "of one length"),
        ({"t_threshold": np.array([np.nan, 0, 0], np.float32)}, "NaN"),
        ({"t_missing_left": np.array([2, 0, 0], np.int32)}, "0 or 1"),
        ({"t_roots": np.array([5], np.int32)}, "outside the nodes"),
        ({"t_baseline": np.array([0.1, 0.2], np.float32)}, "baseline"),
    ],
)
def test_malformed_trees_are_named(change: dict[str, np.ndarray], fragment: str) -> None:
    problem = tree_problems(stump() | change, "t", n_features=2)
    assert problem is not None and fragment in problem


def test_missing_tree_arrays_are_named() -> None:
    arrays = stump()
    del arrays["t_value"]
    assert "t_value" in (tree_problems(arrays, "t", n_features=2) or "")


def test_averaged_ensembles_score_the_mean_raw_score() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(600, 5)).astype(np.float32)
    y = X[:, 0] - X[:, 1] + rng.normal(size=600) > 0
    parts = [export_hgb(_fit(X[i::3], y[i::3], max_iter=20 + 5 * i), "g") for i in range(3)]
    merged = average_ensembles(parts, "g")
    assert tree_problems(merged, "g", n_features=5) is None and len(merged["g_roots"]) == 20 + 25 + 30
    expected = np.mean([tree_raw(part, "g", X) for part in parts], axis=0)
    np.testing.assert_allclose(tree_raw(merged, "g", X), expected, atol=1e-5)
