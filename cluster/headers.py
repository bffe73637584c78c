"""Parse the gateway's own request headers; a bad value is a 400 whose ``param`` names it."""

from __future__ import annotations

from typing import Sequence

from cluster.errors import InvalidRequestError


def parse_choice(header: str | None, *, default: str, allowed: Sequence[str], name: str, what: str) -> str:
    """``header`` lower-cased and stripped when it is one of ``allowed``; ``default`` when absent."""
    if header is None:
        return default
    value = header.strip().lower()
    if value not in allowed:
        raise InvalidRequestError(f"Unknown {what} {header!r}; use one of {', '.join(allowed)}.", param=name, code="invalid_header")
    return value
