"""Router training and evaluation data: JSON lines shaped like ``../shared/data/router``.

Each line has ``prompt``; MMLU-style lines add ``subject``, ``domain``, ``weak_correct`` and
``strong_correct``; GSM8K-style lines have ``prompt`` and ``domain`` only (their subject is
taken to be ``gsm8k``); chat lines (``router_models/chat_labels.py``) have ``domain``,
``subject`` ``chat:<domain>`` and ``sample``. The validation split is a pure function of
the prompt and the seed, so it is the same whatever the file order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cluster.errors import InvalidRequestError
from cluster.jsonl import json_lines  # noqa: F401 - re-exported: router_models reads its files through it

GSM8K_SUBJECT = "gsm8k"
CHAT_SUBJECT_PREFIX = "chat:"  # chat rows' subjects: chat:code, chat:general, ...


@dataclass(frozen=True)
class Example:
    prompt: str
    domain: str | None
    subject: str | None
    weak_correct: bool | None
    strong_correct: bool | None
    # Chat rows: which labelling round picked the prompt (provenance only; see chat_labels).
    sample: str | None = None

    @property
    def has_correctness(self) -> bool:
        return self.weak_correct is not None and self.strong_correct is not None


def is_chat(ex: Example) -> bool:
    return bool(ex.subject and ex.subject.startswith(CHAT_SUBJECT_PREFIX))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _example(obj: dict, where: str) -> Example:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"{where}: every line needs a string 'prompt'", param="prompt")
    subject = obj.get("subject")
    if subject is None and obj.get("domain") == "math" and "weak_correct" not in obj:
        subject = GSM8K_SUBJECT
    weak, strong = obj.get("weak_correct"), obj.get("strong_correct")
    sample = obj.get("sample")
    return Example(prompt, obj.get("domain"), subject, None if weak is None else bool(weak), None if strong is None else bool(strong),
                   sample if isinstance(sample, str) else None)


def read_jsonl(path: str | Path) -> list[Example]:
    out = []
    for where, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise InvalidRequestError(f"{where}: each line must be a JSON object")
        out.append(_example(obj, where))
    return out


def read_many(paths: Iterable[str | Path]) -> list[Example]:
    return [ex for p in paths for ex in read_jsonl(p)]


def is_validation(prompt: str, seed: int, share: float = 0.2) -> bool:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def split(examples: Sequence[Example], seed: int, share: float = 0.2) -> tuple[list[Example], list[Example]]:
    train, val = [], []
    for ex in examples:
        (val if is_validation(ex.prompt, seed, share) else train).append(ex)
    return train, val
