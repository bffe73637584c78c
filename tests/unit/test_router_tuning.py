"""Tuning the embedder's top layers (router_models.tuning) and swapping them in at load."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from router_models.artifact import TUNED_FIELDS  # noqa: E402
from router_models.embedder import Embedder  # noqa: E402
from router_models.packed_bert import PackedBert, _Layer  # noqa: E402
from router_models.tuning import TuneSettings, export_layers, tune_top_layers  # noqa: E402

CODE = ["fix my python loop", "sql query for top customers", "javascript fetch returns undefined", "css grid not centering",
        "pytest mock not called", "rust borrow checker error", "bash script to rename files", "react hook runs twice"]
COOK = ["recipe for banana bread", "how long to boil an egg", "vegan lasagna ideas", "how to season a cast iron pan",
        "substitute for buttermilk", "best way to roast garlic", "sourdough starter smells", "marinade for grilled chicken"]


def test_the_artifact_names_every_field_of_a_layer() -> None:
    assert tuple(_Layer.__dataclass_fields__) == TUNED_FIELDS


def test_untuned_layers_round_trip_through_the_artifact_format() -> None:
    base = Embedder(dtype="float32").load()
    same = Embedder(dtype="float32").load()
    assert same.use_tuned_layers(export_layers(base._model.layers[-2:])) == 2
    a, b = base.embed(CODE[:3]), same.embed(CODE[:3])
    assert np.min(np.sum(a * b, axis=1)) > 0.9999  # float16 storage rounds the weights a little


def _separation(X: np.ndarray) -> float:
    """Mean cosine within the two groups minus mean cosine across them."""
    sims = X @ X.T
    n = len(CODE)
    within = (sims[:n, :n].mean() + sims[n:, n:].mean()) / 2
    return float(within - sims[:n, n:].mean())


def test_tuning_pulls_each_class_together() -> None:
    embedder = Embedder(dtype="float32").load()
    texts = CODE + COOK
    before = _separation(embedder.embed(texts))
    model = PackedBert(embedder.folder, dtype=torch.float32)
    arrays = tune_top_layers(model, embedder.token_ids(texts), [0] * len(CODE) + [1] * len(COOK), 2,
                             TuneSettings(layers=1, epochs=6, batch_size=8, layer_lr=3e-4))
    assert set(arrays) == {f"tuned_0_{f}" for f in TUNED_FIELDS} and all(a.dtype == np.float16 for a in arrays.values())
    embedder.use_tuned_layers(arrays)
    assert _separation(embedder.embed(texts)) > before + 0.05


def test_tuned_layers_that_do_not_fit_the_checkpoint_are_refused() -> None:
    embedder = Embedder().load()
    bad = {f"tuned_0_{f}": np.zeros((3, 3), np.float16) for f in TUNED_FIELDS}
    with pytest.raises(ValueError, match="tuned_0_qkv_w has shape"):
        embedder.use_tuned_layers(bad)


def test_an_artifact_whose_tuned_layers_do_not_fit_fails_to_load(tmp_path) -> None:
    from cluster.errors import ArtifactError
    from router_models.artifact import save_artifact
    from router_models.trained import load_with_embedder
    from tests.unit.test_router_artifact import arrays, metadata

    meta = metadata(fingerprint=Embedder(dtype="float32").fingerprint)
    meta["embedder"].update(dtype="float32", tuned_layers=1)
    save_artifact(tmp_path / "a", meta, {**arrays(), **{f"tuned_0_{f}": np.zeros((3, 3), np.float16) for f in TUNED_FIELDS}})
    with pytest.raises(ArtifactError, match="tuned_0_qkv_w has shape"):
        load_with_embedder(tmp_path / "a")
