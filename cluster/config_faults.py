"""Config of the fault handling (``strategy.frontier_breaker``); apart from ``config.py`` to
keep that file small. It needs no other config class, so ``config.py`` imports it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cluster.breaker import BreakerSettings


class BreakerConfig(BaseModel):
    """The frontier's circuit breaker (``cluster.breaker``; docs/faults.md), one per gateway replica."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # as config.Strict, which imports this module

    enabled: bool = Field(True, description="Open the breaker after repeated frontier failures (off: every call is tried).")
    failures: int = Field(5, ge=1, description="Frontier calls that fail (5xx or timeout) within window_s before the breaker opens.")
    window_s: float = Field(30.0, gt=0, description="How long a frontier failure counts towards opening the breaker.")
    cooldown_s: float = Field(
        30.0, gt=0, description="How long an open breaker refuses frontier calls before one trial call may go (half-open)."
    )

    def settings(self) -> BreakerSettings:
        return BreakerSettings(failures=self.failures, window_s=self.window_s, cooldown_s=self.cooldown_s)
