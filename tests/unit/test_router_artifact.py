"""Router heads, artifact checks, thresholds and data splits: pure numpy, no embedder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.config import DOMAINS
from cluster.errors import ArtifactError, InvalidRequestError
from router_models.artifact import METADATA, TUNED_FIELDS, TUNED_PREFIX, WEIGHTS, load_artifact, save_artifact
from router_models.data import GSM8K_SUBJECT, read_jsonl, split
from router_models.evaluate import threshold_for_rate, threshold_for_scores_quality
from router_models.features import CHEAP_FEATURES, with_features
from router_models.heads import GBT_PREFIXES, SIGNALS, escalation_signals, predict, sigmoid, softmax

DIM = 8
HIDDEN = 4
SUBJECTS = ["algebra", "law", "misc"]


def stump(prefix: str, feature: int, value: float) -> dict[str, np.ndarray]:
    """One boosted tree: the root splits ``feature`` at 0.5 into two leaves."""
    return {
        f"{prefix}_feature": np.array([feature, 0, 0], np.int32),
        f"{prefix}_threshold": np.array([0.5, 0, 0], np.float32),
        f"{prefix}_missing_left": np.array([1, 0, 0], np.int32),
        f"{prefix}_left": np.array([1, 1, 2], np.int32),
        f"{prefix}_right": np.array([2, 1, 2], np.int32),
        f"{prefix}_value": np.array([0, -value, value], np.float32),
        f"{prefix}_roots": np.array([0], np.int32),
        f"{prefix}_baseline": np.array([-0.5], np.float32),
    }


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mapping = np.zeros((3, len(DOMAINS)), dtype=np.float32)
    for i, d in enumerate(["math", "legal", "general"]):
        mapping[i, DOMAINS.index(d)] = 1
    wide = DIM + len(CHEAP_FEATURES)
    out = {
        "subject_W": rng.normal(size=(DIM, 3)).astype(np.float32),
        "subject_b": np.zeros(3, np.float32),
        "subject_domain": mapping,
        "subject_escalation": np.array([0.3, 0.1, 0.05], np.float32),
        "subject_gain": np.array([0.2, 0.0, -0.05], np.float32),
        "cheap_mean": np.zeros(len(CHEAP_FEATURES), np.float32),
        "cheap_std": np.ones(len(CHEAP_FEATURES), np.float32),
        "weak_wrong_w": rng.normal(size=wide).astype(np.float32),
        "weak_wrong_b": np.zeros(1, np.float32),
        "strong_right_w": rng.normal(size=wide).astype(np.float32),
        "strong_right_b": np.zeros(1, np.float32),
        "blend_stats": np.concatenate([np.full(len(SIGNALS), 0.1), np.full(len(SIGNALS), 0.2)]).astype(np.float32),
    }
    out.update(stump(GBT_PREFIXES[0], 0, 0.4))  # splits on the first subject probability
    out.update(stump(GBT_PREFIXES[1], 3, 0.8))  # splits on the first cheap feature
    for prefix in ("mlp_weak_wrong", "mlp_strong_right"):
        out[f"{prefix}_W1"] = rng.normal(size=(wide, HIDDEN)).astype(np.float32)
        out[f"{prefix}_b1"] = np.zeros(HIDDEN, np.float32)
        out[f"{prefix}_W2"] = rng.normal(size=HIDDEN).astype(np.float32)
        out[f"{prefix}_b2"] = np.zeros(1, np.float32)
    return out


def metadata(fingerprint: str = "abc") -> dict:
    return {"domains": list(DOMAINS), "subjects": SUBJECTS, "feature_dim": DIM,
            "embedder": {"name": "minilm", "fingerprint": fingerprint, "max_tokens": 256},
            "thresholds": {"escalation": 0.5}, "mlp_hidden": HIDDEN}


def test_heads_give_probabilities_consistent_with_subjects() -> None:
    X = np.random.default_rng(1).normal(size=(5, DIM)).astype(np.float32)
    out = predict(arrays(), X, ["what is 2+2?", "a\nb", "", "$5 loan", "x" * 40])
    assert out.subject_probs.shape == (5, 3) and out.domain_probs.shape == (5, len(DOMAINS))
    np.testing.assert_allclose(out.domain_probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(out.domain_probs[:, DOMAINS.index("math")], out.subject_probs[:, 0], atol=1e-6)
    assert ((out.escalation > 0) & (out.escalation < 1)).all()


def test_tree_signals_read_the_subject_probabilities_and_cheap_features() -> None:
    a = arrays()
    X = np.random.default_rng(2).normal(size=(6, DIM)).astype(np.float32)
    texts = ["2+2", "long " * 50, "", "a\nb\nc", "$3", "law"]
    probs = softmax(X @ a["subject_W"] + a["subject_b"])
    XF = with_features(X, texts, a["cheap_mean"], a["cheap_std"])
    signals = escalation_signals(a, XF, probs)
    assert signals.shape == (6, len(SIGNALS))
    weak_wrong = sigmoid(-0.5 + np.where(probs[:, 0] <= 0.5, -0.4, 0.4))
    strong_right = sigmoid(-0.5 + np.where(XF[:, DIM] <= 0.5, -0.8, 0.8))
    np.testing.assert_allclose(signals[:, SIGNALS.index("gbt_pair")], weak_wrong * strong_right, rtol=1e-5)
    np.testing.assert_allclose(signals[:, SIGNALS.index("gbt_gain")], strong_right - (1 - weak_wrong), rtol=1e-5, atol=1e-6)


def test_artifact_round_trip(tmp_path) -> None:
    save_artifact(tmp_path / "a", metadata(), arrays())
    art = load_artifact(tmp_path / "a", expect_fingerprint="abc")
    assert art.subjects == SUBJECTS and art.escalation_threshold == 0.5
    np.testing.assert_array_equal(art.arrays["subject_W"], arrays()["subject_W"])
    assert art.arrays[f"{GBT_PREFIXES[0]}_left"].dtype == np.int32  # tree indices stay integers


def _corrupt_missing_dir(p):
    return p / "nope"


def _corrupt_no_metadata(p):
    (p / METADATA).unlink()
    return p


def _corrupt_bad_json(p):
    (p / METADATA).write_text("{not json")
    return p


def _corrupt_version(p):
    meta = json.loads((p / METADATA).read_text())
    meta["format_version"] = 99
    (p / METADATA).write_text(json.dumps(meta))
    return p


def _corrupt_weights(p):
    (p / WEIGHTS).write_bytes(b"garbage")
    return p


def _corrupt_shape(p):
    bad = arrays()
    bad["subject_W"] = bad["subject_W"][:, :2]
    save_artifact(p, metadata(), bad)
    return p


def _corrupt_nan(p):
    bad = arrays()
    bad["weak_wrong_w"][0] = np.nan
    save_artifact(p, metadata(), bad)
    return p


def _corrupt_tree(**change):
    def corrupt(p):
        bad = arrays()
        bad.update({f"{GBT_PREFIXES[0]}_{k}": v for k, v in change.items()})
        save_artifact(p, metadata(), bad)
        return p

    return corrupt


def _corrupt_missing_tree_array(p):
    bad = arrays()
    del bad[f"{GBT_PREFIXES[1]}_roots"]
    save_artifact(p, metadata(), bad)
    return p


def _tuned_layer(value: float = 0.5) -> dict[str, np.ndarray]:
    return {f"{TUNED_PREFIX}_0_{name}": np.full((2, 2), value, np.float16) for name in TUNED_FIELDS}


def _corrupt_tuned_count(p):
    meta = metadata()
    meta["embedder"]["tuned_layers"] = 2  # only one layer stored
    save_artifact(p, meta, {**arrays(), **_tuned_layer()})
    return p


def _corrupt_tuned_nan(p):
    meta = metadata()
    meta["embedder"]["tuned_layers"] = 1
    save_artifact(p, meta, {**arrays(), **_tuned_layer(np.nan)})
    return p


def _corrupt_old_blend(p):
    bad = arrays()
    bad["blend_stats"] = bad["blend_stats"][:6]
    save_artifact(p, metadata(), bad)
    return p


def _corrupt_thresholds(**thresholds):
    def corrupt(p):
        meta = metadata()
        meta["thresholds"] = {"escalation": 0.5, **thresholds}
        save_artifact(p, meta, arrays())
        return p

    return corrupt


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (_corrupt_thresholds(by_domain={"cooking": 0.4}), "thresholds.by_domain must map known domains"),
        (_corrupt_thresholds(by_domain={"code": "high"}), "thresholds.by_domain.code must be a finite number"),
        (_corrupt_thresholds(escalation=float("nan")), "thresholds.escalation must be a finite number"),
        (_corrupt_missing_dir, "no such artifact folder"),
        (_corrupt_no_metadata, "metadata.json is missing"),
        (_corrupt_bad_json, "not valid JSON"),
        (_corrupt_version, "format_version"),
        (_corrupt_weights, "unreadable"),
        (_corrupt_shape, "subject_W has shape"),
        (_corrupt_nan, "NaN"),
        (_corrupt_old_blend, "blend_stats has shape"),
        (_corrupt_missing_tree_array, "gbt_strong_right_roots"),
        (_corrupt_tuned_count, "metadata says 2 tuned layers"),
        (_corrupt_tuned_nan, "tuned_0_qkv_w holds NaN"),
        (_corrupt_tree(right=np.array([0, 1, 2], np.int32)), "gbt_weak_wrong_right must point after its node"),
        (_corrupt_tree(feature=np.array([8, 0, 0], np.int32)), "gbt_weak_wrong_feature is outside [0, 8)"),
        (_corrupt_tree(left=np.array([1.0, 1.0, 2.0])), "gbt_weak_wrong_left must hold integers"),
        (_corrupt_tree(value=np.array([0.0, 1.0], np.float32)), "of one length"),
        (_corrupt_tree(threshold=np.array([np.inf, 0, 0], np.float32)), "gbt_weak_wrong_threshold holds NaN or infinite"),
    ],
)
def test_bad_artifacts_fail_clearly(tmp_path, corrupt, fragment: str) -> None:
    save_artifact(tmp_path / "a", metadata(), arrays())
    with pytest.raises(ArtifactError) as info:
        load_artifact(corrupt(tmp_path / "a"), expect_fingerprint="abc")
    assert fragment in str(info.value)


def test_thresholds_per_domain_fall_back_to_the_global_one(tmp_path) -> None:
    meta = metadata()
    meta["thresholds"] = {"escalation": 0.5, "by_domain": {"code": 0.8}}
    save_artifact(tmp_path / "a", meta, arrays())
    art = load_artifact(tmp_path / "a")
    assert (art.threshold_for("code"), art.threshold_for("general"), art.escalation_threshold) == (0.8, 0.5, 0.5)


def test_tuned_layers_are_stored_as_float16_and_checked(tmp_path) -> None:
    meta = metadata()
    meta["embedder"]["tuned_layers"] = 1
    save_artifact(tmp_path / "a", meta, {**arrays(), **_tuned_layer()})
    loaded = load_artifact(tmp_path / "a", expect_fingerprint="abc")
    assert loaded.arrays["tuned_0_up_w"].dtype == np.float16 and loaded.arrays["subject_W"].dtype == np.float32


def test_artifact_for_another_embedder_is_refused(tmp_path) -> None:
    save_artifact(tmp_path / "a", metadata(fingerprint="other"), arrays())
    with pytest.raises(ArtifactError, match="built for embedder"):
        load_artifact(tmp_path / "a", expect_fingerprint="abc")


@pytest.mark.parametrize(("rate", "share"), [(0.0, 0.0), (0.1, 0.1), (0.25, 0.25), (0.5, 0.5), (1.0, 1.0)])
def test_threshold_for_rate(rate: float, share: float) -> None:
    scores = np.arange(100, dtype=float) / 100
    t = threshold_for_rate(scores, rate)
    assert np.mean(scores >= t) == pytest.approx(share, abs=0.011)


def test_threshold_for_quality_is_the_cheapest_that_reaches_it() -> None:
    # four requests; only the top-scored one gains from the frontier
    scores = np.array([0.9, 0.5, 0.3, 0.1])
    weak = np.array([False, True, True, False])
    strong = np.array([True, True, True, False])
    t = threshold_for_scores_quality(scores, weak, strong, 1.0)
    assert t == 0.9 and np.mean(scores >= t) == 0.25
    assert threshold_for_scores_quality(scores, weak, strong, 0.5) > 0.9  # weak alone suffices: nobody escalates
    assert threshold_for_scores_quality(scores, weak, strong, 1.5) is None  # unreachable


def test_data_reading_and_split(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "subject": "law", "domain": "legal", "weak_correct": i % 2 == 0, "strong_correct": True} for i in range(200)]
    rows.append({"prompt": "Tom has 3 apples", "domain": "math"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = read_jsonl(path)
    assert len(examples) == 201 and examples[-1].subject == GSM8K_SUBJECT and not examples[-1].has_correctness
    train, val = split(examples, seed=0)
    assert 20 < len(val) < 60 and len(train) + len(val) == 201
    assert split(list(reversed(examples)), seed=0)[1] == list(reversed(val))  # order-independent
    assert split(examples, seed=1)[1] != val
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(InvalidRequestError):
        read_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(InvalidRequestError, match=":1: not JSON"):
        read_jsonl(path)
