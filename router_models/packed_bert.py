"""A packed (padding-free) BERT encoder forward pass for the router's sentence embedder.

Why not ``transformers.AutoModel``: on a 2-core CPU its eager forward spends about half of
a single prompt's time in per-operator overhead, and a batch of prompts of mixed length
must either be padded to the longest (wasted matrix rows) or split into length groups
(each paying the overhead again). Here every prompt's tokens are concatenated into one
``[tokens, hidden]`` matrix, so each linear layer of a batch is one matrix multiply over
real tokens only; only attention, which must not mix prompts, runs per group of similar
length with a key mask. A prompt's rows never meet another prompt's in any reduction, so
its embedding does not depend on its batch-mates (up to the matrix kernel's rounding).

The weights are the checkpoint's own (``model.safetensors``), read without transformers;
``tests/unit/test_packed_bert.py`` checks the result against ``transformers.AutoModel``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _Layer:
    qkv_w: torch.Tensor  # [3 * hidden, hidden]: query, key and value fused into one multiply
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


class PackedBert:
    """``embed(token_ids) -> float32 [n, hidden]``: mean-pooled, L2-normalised sentence vectors."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.bfloat16, attention_group: int = 32,
                 compute: torch.dtype | None = None) -> None:
        """``dtype``: the precision the weights are rounded to (the numerics an artifact's heads
        were fitted on). ``compute``: the dtype the matrices are multiplied in, ``dtype`` when
        None. bfloat16 weights computed in float32 give embeddings within cosine 0.99997 of
        bfloat16 compute (``docs/router.md``, CPU precision), at float32's speed, which on a
        CPU without native bf16 instructions is about 5x bfloat16's."""
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{folder}: not a BERT encoder with exact GELU (model_type={config.get('model_type')!r})")
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.max_positions = int(config["max_position_embeddings"])
        self.weight_dtype = dtype
        self.dtype = compute or dtype
        self.attention_group = attention_group
        w = load_file(str(folder / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""

        def t(name: str) -> torch.Tensor:
            return w[prefix + name].to(dtype).to(self.dtype).contiguous()

        self.word = t("embeddings.word_embeddings.weight")
        self.position = t("embeddings.position_embeddings.weight")
        # Single-segment input: token type 0 for every token, folded into the position table.
        self.position = (self.position + t("embeddings.token_type_embeddings.weight")[0]).contiguous()
        self.emb_ln = (t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"))
        self.layers: list[_Layer] = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            self.layers.append(
                _Layer(
                    qkv_w=torch.cat([t(p + f"attention.self.{k}.weight") for k in ("query", "key", "value")]).contiguous(),
                    qkv_b=torch.cat([t(p + f"attention.self.{k}.bias") for k in ("query", "key", "value")]).contiguous(),
                    out_w=t(p + "attention.output.dense.weight"),
                    out_b=t(p + "attention.output.dense.bias"),
                    ln1_w=t(p + "attention.output.LayerNorm.weight"),
                    ln1_b=t(p + "attention.output.LayerNorm.bias"),
                    up_w=t(p + "intermediate.dense.weight"),
                    up_b=t(p + "intermediate.dense.bias"),
                    down_w=t(p + "output.dense.weight"),
                    down_b=t(p + "output.dense.bias"),
                    ln2_w=t(p + "output.LayerNorm.weight"),
                    ln2_b=t(p + "output.LayerNorm.bias"),
                )
            )

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        if not token_ids:
            return torch.zeros((0, self.hidden), dtype=torch.float32)
        batch = self.pack(token_ids)
        return self.pool(self.run_layers(self.embed_tokens(batch), batch, self.layers), batch)

    def pack(self, token_ids: Sequence[Sequence[int]]) -> "Packed":
        """A batch's bookkeeping: lengths, each row's prompt, and the attention groups."""
        lengths = [len(ids) for ids in token_ids]
        if not lengths or min(lengths) < 1 or max(lengths) > self.max_positions:
            raise ValueError(f"token sequences must hold 1..{self.max_positions} tokens, got {lengths[:1] and (min(lengths), max(lengths))}")
        ids = torch.tensor([i for seq in token_ids for i in seq], dtype=torch.long)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return Packed(ids, lengths, segment, _attention_groups(lengths, self.attention_group))

    def embed_tokens(self, batch: "Packed") -> torch.Tensor:
        positions = torch.cat([torch.arange(n) for n in batch.lengths])
        return F.layer_norm(self.word[batch.ids] + self.position[positions], (self.hidden,), *self.emb_ln, self.eps)

    def run_layers(self, x: torch.Tensor, batch: "Packed", layers: Sequence["_Layer"]) -> torch.Tensor:
        """``layers`` over the packed ``[tokens, hidden]`` matrix. Differentiable: router
        tuning (``router_models.tuning``) trains the top layers through this same code."""
        for layer in layers:
            attn = self._attention(F.linear(x, layer.qkv_w, layer.qkv_b), batch.groups)
            x = F.layer_norm(x + F.linear(attn, layer.out_w, layer.out_b), (self.hidden,), layer.ln1_w, layer.ln1_b, self.eps)
            up = F.gelu(F.linear(x, layer.up_w, layer.up_b))
            x = F.layer_norm(x + F.linear(up, layer.down_w, layer.down_b), (self.hidden,), layer.ln2_w, layer.ln2_b, self.eps)
        return x

    def pool(self, x: torch.Tensor, batch: "Packed") -> torch.Tensor:
        # Mean over each prompt's tokens (all real: nothing is padded), in float32.
        sums = torch.zeros((len(batch.lengths), self.hidden), dtype=torch.float32).index_add_(0, batch.segment, x.float())
        pooled = sums / torch.tensor(batch.lengths, dtype=torch.float32).unsqueeze(1)
        return F.normalize(pooled, p=2, dim=1)

    def replace_top_layers(self, arrays: dict[str, "np.ndarray"], prefix: str = "tuned") -> int:
        """Swap in tuned top layers stored as ``{prefix}_{k}_{field}`` arrays (k counted from
        the top, 0 = last layer); returns how many were replaced."""
        count = 0
        while f"{prefix}_{count}_qkv_w" in arrays:
            count += 1
        if count > len(self.layers):
            raise ValueError(f"{count} tuned layers for a {len(self.layers)}-layer encoder")
        for k in range(count):
            index = len(self.layers) - 1 - k
            fields = {}
            for name in _Layer.__dataclass_fields__:
                value = np.asarray(arrays[f"{prefix}_{k}_{name}"], dtype=np.float32)
                expected = tuple(getattr(self.layers[index], name).shape)
                if value.shape != expected:
                    raise ValueError(f"{prefix}_{k}_{name} has shape {value.shape}; this encoder's layer has {expected}")
                fields[name] = torch.from_numpy(value).to(self.weight_dtype).to(self.dtype).contiguous()
            self.layers[index] = _Layer(**fields)
        return count

    def _attention(self, qkv: torch.Tensor, groups: list["_Group"]) -> torch.Tensor:
        tokens = qkv.shape[0]
        head_dim = self.hidden // self.heads
        out = torch.empty((tokens, self.hidden), dtype=qkv.dtype)
        # One zero row past the end stands in for padding positions when gathering.
        padded = torch.cat([qkv, qkv.new_zeros((1, qkv.shape[1]))])
        for g in groups:
            q, k, v = padded[g.index].view(g.size, g.width, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask)
            out[g.rows] = ctx.transpose(1, 2).reshape(g.size * g.width, self.hidden)[g.valid]
        return out


@dataclass(frozen=True)
class Packed:
    ids: torch.Tensor  # every prompt's token ids, concatenated
    lengths: list[int]
    segment: torch.Tensor  # each row's prompt
    groups: list["_Group"]


@dataclass(frozen=True)
class _Group:
    """Prompts whose attention runs together, padded to the longest of them."""

    size: int
    width: int
    index: torch.Tensor  # [size, width] rows of the packed matrix; padding points past the end
    key_mask: torch.Tensor | None  # [size, 1, 1, width] True where a key is a real token
    valid: torch.Tensor  # positions of real tokens in the flattened [size * width] grid
    rows: torch.Tensor  # the packed rows those real tokens go back to


def _attention_groups(lengths: Sequence[int], limit: int) -> list[_Group]:
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    total = starts[-1] + lengths[-1]
    groups = []
    # Similar lengths together, so padding (and wasted attention work) stays small.
    for members in _length_buckets(lengths, limit):
        width = max(lengths[i] for i in members)
        index = torch.full((len(members), width), total, dtype=torch.long)
        for r, i in enumerate(members):
            index[r, : lengths[i]] = torch.arange(starts[i], starts[i] + lengths[i])
        real = index < total
        flat = real.reshape(-1)
        mask = None if bool(real.all()) else real[:, None, None, :]
        groups.append(_Group(len(members), width, index, mask, flat.nonzero().squeeze(1), index.reshape(-1)[flat]))
    return groups


def _length_buckets(lengths: Sequence[int], limit: int, stretch: float = 1.3, slack: int = 8) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets: list[list[int]] = []
    for i in order:
        if buckets and len(buckets[-1]) < limit and lengths[i] <= lengths[buckets[-1][0]] * stretch + slack:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets
