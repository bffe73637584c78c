"""Load shapes as pure schedules: (elapsed seconds) -> (users, spawn rate), or None to stop.

Every shape ends: a schedule past its duration returns None, and the locustfile's
``LoadTestShape`` stops the run there. ``peak`` is the run's ``-u``; ``rate`` its ``-r``.

- ``steady``: ``peak`` users for ``duration`` (what plain ``-u -r -t`` does).
- ``ramp``: ``steps`` equal steps from ``peak/steps`` up to ``peak`` users, each held for
  ``duration/steps`` seconds: a capacity sweep, one plateau per point of the plot.
- ``spike``: a quarter of ``peak`` for the first third, ``peak`` (spawned at once) for the
  second, a quarter again for the last: how fast latency recovers after a burst.
- ``soak``: ``peak`` users for ``duration``, longer by default; leaks and drift.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("steady", "ramp", "spike", "soak")
DEFAULT_DURATION_S = {"steady": 60.0, "ramp": 180.0, "spike": 90.0, "soak": 600.0}
MAX_DURATION_S = 4 * 3600.0  # a soak is long, never endless


@dataclass(frozen=True)
class Schedule:
    kind: str
    peak: int
    rate: float
    duration_s: float
    steps: int = 6

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"unknown load shape {self.kind!r}; use one of {', '.join(SHAPES)}")
        if self.peak < 1 or self.rate <= 0 or self.steps < 1:
            raise ValueError("a load shape needs at least one user, a positive spawn rate and one step")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"a load shape lasts more than 0 s and at most {MAX_DURATION_S:.0f} s")

    def at(self, t: float) -> tuple[int, float] | None:
        if t >= self.duration_s:
            return None
        if self.kind in ("steady", "soak"):
            return self.peak, self.rate
        if self.kind == "ramp":
            step = min(int(t / (self.duration_s / self.steps)), self.steps - 1)
            return max(1, round(self.peak * (step + 1) / self.steps)), self.rate
        base = max(1, self.peak // 4)  # spike
        if self.duration_s / 3 <= t < 2 * self.duration_s / 3:
            return self.peak, float(self.peak)  # all at once: that is the spike
        return base, self.rate


def schedule(kind: str, peak: int, rate: float, duration_s: float | None, steps: int = 6) -> Schedule:
    return Schedule(kind, peak, rate, duration_s if duration_s else DEFAULT_DURATION_S.get(kind, 60.0), steps)
