"""The trained router artifact: a folder with ``heads.npz`` (weights) and ``metadata.json``.

Small (under a megabyte: linear and MLP heads over a 384-d embedding, per-subject tables,
and boosted trees flattened into numpy arrays, ``router_models.trees``), pickle-free and
loadable without network. ``load_artifact`` checks everything a router needs before it
serves, so a missing, corrupt or foreign artifact fails at start, never at a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.errors import ArtifactError
from router_models.features import CHEAP_FEATURES
from router_models.heads import GBT_PREFIXES, SIGNALS
from router_models.trees import tree_array_names, tree_problems

# 2: the boosted-tree heads, the per-subject gain table and eight blended signals.
# 3: the embedder's tuned top layers (``tuned_{k}_{field}``, float16) and chat subjects.
FORMAT_VERSION = 3
# The fields of one tuned encoder layer (router_models.packed_bert._Layer); their shapes
# are checked against the installed checkpoint when the layers are swapped in.
TUNED_PREFIX = "tuned"
TUNED_FIELDS = ("qkv_w", "qkv_b", "out_w", "out_b", "ln1_w", "ln1_b", "up_w", "up_b", "down_w", "down_b", "ln2_w", "ln2_b")
METADATA = "metadata.json"
WEIGHTS = "heads.npz"
# Arrays every artifact must hold (shapes checked in _check_shapes).
REQUIRED_ARRAYS = (
    "subject_W", "subject_b", "subject_domain", "subject_escalation", "subject_gain", "cheap_mean", "cheap_std",
    "weak_wrong_w", "weak_wrong_b", "strong_right_w", "strong_right_b",
    "mlp_weak_wrong_W1", "mlp_weak_wrong_b1", "mlp_weak_wrong_W2", "mlp_weak_wrong_b2",
    "mlp_strong_right_W1", "mlp_strong_right_b1", "mlp_strong_right_W2", "mlp_strong_right_b2",
    "blend_stats",
    *(name for prefix in GBT_PREFIXES for name in tree_array_names(prefix)),
)
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "default"


@dataclass(frozen=True)
class RouterArtifact:
    path: Path
    metadata: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def domains(self) -> list[str]:
        return list(self.metadata["domains"])

    @property
    def subjects(self) -> list[str]:
        return list(self.metadata["subjects"])

    @property
    def escalation_threshold(self) -> float:
        return float(self.metadata["thresholds"]["escalation"])

    def threshold_for(self, domain: str) -> float:
        """The escalation threshold for a request routed to ``domain``: its own when the
        artifact was calibrated per domain (``thresholds.by_domain``), else the global one."""
        by = self.metadata["thresholds"].get("by_domain") or {}
        return float(by.get(domain, self.escalation_threshold))

    @property
    def embedder(self) -> dict[str, Any]:
        return dict(self.metadata["embedder"])


def artifact_error(path: Path, reason: str) -> ArtifactError:
    """The ArtifactError for a problem with the artifact at ``path``."""
    return ArtifactError(f"router artifact {path}: {reason}", issues=(("router.artifact_path", f"{path}: {reason}"),), source=str(path))


def _stored(value: np.ndarray) -> np.ndarray:
    """Weights as float32, tuned encoder layers as the float16 they were exported in (half
    the size; they serve in bfloat16, which float16 holds exactly enough); integer arrays
    (tree node indices and features) as int32."""
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer):
        return value.astype(np.int32)
    return value if value.dtype == np.float16 else value.astype(np.float32)


def save_artifact(path: Path, metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path / WEIGHTS, **{k: _stored(v) for k, v in arrays.items()})
    (path / METADATA).write_text(json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2, sort_keys=True) + "\n")
    return path


def load_artifact(path: str | Path, *, expect_fingerprint: str | None = None) -> RouterArtifact:
    """Load and check an artifact. Raises ``ArtifactError`` naming the problem."""
    path = Path(path)
    if not path.is_dir():
        raise artifact_error(path, "no such artifact folder")
    try:
        metadata = json.loads((path / METADATA).read_text())
    except FileNotFoundError:
        raise artifact_error(path, f"{METADATA} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise artifact_error(path, f"{METADATA} is not valid JSON ({err})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise artifact_error(path, f"format_version {metadata.get('format_version')!r}; this build reads {FORMAT_VERSION}")
    for key in ("domains", "subjects", "embedder", "thresholds", "feature_dim", "mlp_hidden"):
        if key not in metadata:
            raise artifact_error(path, f"{METADATA} lacks {key!r}")
    if expect_fingerprint is not None and metadata["embedder"].get("fingerprint") != expect_fingerprint:
        raise artifact_error(
            path,
            f"built for embedder {metadata['embedder'].get('name')} ({metadata['embedder'].get('fingerprint')}), "
            f"but the installed embedder is {expect_fingerprint}",
        )
    try:
        with np.load(path / WEIGHTS) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise artifact_error(path, f"{WEIGHTS} is missing") from None
    except Exception as err:  # noqa: BLE001 - any unreadable weights file is the same problem
        raise artifact_error(path, f"{WEIGHTS} is unreadable ({type(err).__name__}: {err})") from None
    _check_shapes(path, metadata, arrays)
    _check_thresholds(path, metadata)
    return RouterArtifact(path=path, metadata=metadata, arrays=arrays)


def _check_thresholds(path: Path, metadata: dict[str, Any]) -> None:
    thresholds = metadata["thresholds"]
    values = {"escalation": thresholds.get("escalation")}
    by = thresholds.get("by_domain") or {}
    if not isinstance(by, dict) or not set(by) <= set(metadata["domains"]):
        raise artifact_error(path, f"thresholds.by_domain must map known domains to thresholds, got {by!r}")
    values.update({f"by_domain.{d}": v for d, v in by.items()})
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            raise artifact_error(path, f"thresholds.{name} must be a finite number, got {value!r}")


def _check_shapes(path: Path, metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise artifact_error(path, f"{WEIGHTS} lacks {missing}")
    dim, n_dom, n_sub = int(metadata["feature_dim"]), len(metadata["domains"]), len(metadata["subjects"])
    wide, hidden = dim + len(CHEAP_FEATURES), int(metadata["mlp_hidden"])
    expected = {
        "subject_W": (dim, n_sub),
        "subject_b": (n_sub,),
        "subject_domain": (n_sub, n_dom),
        "subject_escalation": (n_sub,),
        "subject_gain": (n_sub,),
        "cheap_mean": (len(CHEAP_FEATURES),),
        "cheap_std": (len(CHEAP_FEATURES),),
        "weak_wrong_w": (wide,),
        "weak_wrong_b": (1,),
        "strong_right_w": (wide,),
        "strong_right_b": (1,),
        "blend_stats": (2 * len(SIGNALS),),
    }
    for prefix in ("mlp_weak_wrong", "mlp_strong_right"):
        expected.update({f"{prefix}_W1": (wide, hidden), f"{prefix}_b1": (hidden,), f"{prefix}_W2": (hidden,), f"{prefix}_b2": (1,)})
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise artifact_error(path, f"{name} has shape {arrays[name].shape}, expected {shape}")
    # Tuned layers' shapes are checked against the checkpoint when they are swapped in.
    tuned = [k for k in arrays if k.startswith(f"{TUNED_PREFIX}_")]
    layers = int(metadata["embedder"].get("tuned_layers", 0))
    if len(tuned) != layers * len(TUNED_FIELDS) or any(f"{TUNED_PREFIX}_{k}_{f}" not in arrays for k in range(layers) for f in TUNED_FIELDS):
        raise artifact_error(path, f"{WEIGHTS} holds {len(tuned)} tuned-layer arrays; metadata says {layers} tuned layers of {len(TUNED_FIELDS)}")
    for name in [*expected, *tuned]:
        if not np.all(np.isfinite(arrays[name])):
            raise artifact_error(path, f"{name} holds NaN or infinite values")
    if np.any(arrays["blend_stats"][len(SIGNALS):] <= 0):
        raise artifact_error(path, "blend_stats has a non-positive standard deviation")
    for prefix in GBT_PREFIXES:  # the trees see the subject probabilities and the cheap features
        problem = tree_problems(arrays, prefix, n_sub + len(CHEAP_FEATURES))
        if problem:
            raise artifact_error(path, f"{WEIGHTS}: {problem}")
