"""The config of managed API keys and their limits (``gateway.keys``; docs/api_keys.md).

Kept apart from ``cluster/config.py`` so that file stays short; it is part of the same tree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FailMode = Literal["open", "closed"]


class KeysConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    managed: bool = Field(
        False,
        description="Also accept the keys that `slmctl keys create` stores (hashed) in Redis, with their scopes and limits; "
        "needs a Redis (redis.url, or the embedded one of `slmctl up`).",
    )
    cache_ttl_s: float = Field(
        0.5, gt=0, le=10, description="How long a gateway trusts a key it verified in Redis before asking again (revocation takes this long)."
    )
    stale_ttl_s: float = Field(
        300.0, ge=0, description="While Redis is unreachable, keys verified within this many seconds still authenticate (0: none do)."
    )
    rate_limits_fail: FailMode = Field(
        "open",
        description="Requests and tokens per minute while Redis is unreachable: open (serve unlimited) or closed (503 key_store_unavailable).",
    )
    budgets_fail: FailMode = Field(
        "closed", description="USD per day while Redis is unreachable: closed (503 key_store_unavailable) or open (serve, uncounted)."
    )
