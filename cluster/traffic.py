"""Traffic splits between the versions of one model: validation and sticky choice.

A split maps a model's versions to integer weights summing to 100. Requests that name the
model (``code``), and ``auto`` requests routed to it, follow the split; a pinned version
(``code@v2``) ignores it.

Sticky choice: a request with a key (the OpenAI ``user`` field, else the ``x-slm-session``
header) hashes, with the model's name, to a point in [0, 100); the versions hold
consecutive ranges in a fixed order with the *stable* (current) version last. A key stays
on its version while the weights hold, and as a candidate's weight grows from the front
its range only grows, so a key that reached the candidate stays there. Requests without a
key are spread by weight at random.
"""

from __future__ import annotations

import hashlib
import random
from typing import Mapping, Sequence

from cluster.config import ModelConfig
from cluster.errors import InvalidRequestError

SESSION_HEADER = "x-slm-session"
TOTAL = 100


def validate(model: ModelConfig, weights: Mapping[str, object]) -> dict[str, int]:
    """Integer weights over known versions summing to 100; InvalidRequestError with a
    one-line reason otherwise. Versions left out get 0."""
    known = [v.name for v in model.versions]
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise InvalidRequestError(f"{model.name} has no version {', '.join(unknown)}; its versions: {', '.join(known)}", param="weights")
    out: dict[str, int] = {}
    for version in known:
        value = weights.get(version, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
            raise InvalidRequestError(f"the weight of {model.name}@{version} must be a whole number from 0 to 100, got {value!r}", param="weights")
        out[version] = int(value)
    if sum(out.values()) != TOTAL:
        raise InvalidRequestError(f"the weights of {model.name} must sum to {TOTAL}, got {sum(out.values())}", param="weights")
    return out


def default_split(model: ModelConfig) -> dict[str, int]:
    """All traffic on the current version."""
    return {v.name: (TOTAL if v.name == model.current.name else 0) for v in model.versions}


def ordered(model: ModelConfig, weights: Mapping[str, int], stable: str | None = None) -> list[tuple[str, int]]:
    """The versions in range order: every other version in config order, the stable one
    (the current version unless given) last."""
    stable = stable or model.current.name
    names = [v.name for v in model.versions if v.name != stable] + [stable]
    return [(name, int(weights.get(name, 0))) for name in names]


def point(model: str, key: str) -> float:
    """Where a key falls in [0, 100) for this model: a hash, so every gateway agrees."""
    digest = hashlib.sha256(f"{model}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * TOTAL


def pick(ranges: Sequence[tuple[str, int]], model: str, key: str | None, rng: random.Random | None = None) -> str:
    """The version a request goes to: by the key's point when it has one, else at random."""
    at = point(model, key) if key else (rng or random).random() * TOTAL
    upper = 0
    for name, weight in ranges:
        upper += weight
        if at < upper:
            return name
    # Only reachable when every weight is 0 (an invalid split): the stable version.
    return ranges[-1][0]


def request_key(user: str | None, session: str | None) -> str | None:
    """The stickiness key: the OpenAI ``user`` field, else the session header."""
    return user or session or None
