"""A circuit breaker for one upstream (the frontier): a pure state machine, clock passed in.

closed     calls go; each failure is remembered for ``window_s``. ``failures`` of them
           inside the window open the breaker.
open       no call goes for ``cooldown_s``; callers answer without the upstream (the small
           answer, flagged ``x-slm-escalated: failed``) or refuse at once (a 503 with
           ``Retry-After``: ``blocked_for``).
half-open  after the cooldown, one trial call goes; the others are refused as in open. The
           trial's success closes the breaker (failures forgotten), its failure opens it
           for another cooldown, and a trial that ends without a verdict (cancelled, or a
           client error) frees the slot for the next caller.

Only the caller knows what a failure is: it reports ``success()`` / ``failure()`` /
``release()`` for every call that ``acquire()`` let through.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# What a refused caller is told to wait while a half-open trial runs: the trial's verdict
# is not known, so a short wait rather than a whole cooldown.
TRIAL_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 5
    window_s: float = 30.0
    cooldown_s: float = 30.0


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._failures: deque[float] = deque()
        self._opened_at: float | None = None
        self._trial = False  # a half-open trial call is in flight
        self.opened = 0  # times the breaker opened (for status and tests)

    def state(self, now: float) -> str:
        if self._opened_at is None:
            return CLOSED
        if now < self._opened_at + self.settings.cooldown_s:
            return OPEN
        return HALF_OPEN

    def blocked_for(self, now: float) -> float:
        """Seconds until a call may go (0.0: it may go now). Reads only; ``acquire`` takes
        the half-open trial."""
        state = self.state(now)
        if state == CLOSED:
            return 0.0
        if state == OPEN:
            assert self._opened_at is not None
            return self._opened_at + self.settings.cooldown_s - now
        return TRIAL_RETRY_AFTER_S if self._trial else 0.0

    def acquire(self, now: float) -> float:
        """Let one call through (0.0, and in half-open it is the trial) or refuse it: the
        seconds to wait, > 0."""
        wait = self.blocked_for(now)
        if wait > 0:
            return wait
        if self.state(now) == HALF_OPEN:
            self._trial = True
        return 0.0

    def success(self, now: float) -> None:
        if self.state(now) == HALF_OPEN or self._trial:
            self._close()
        self._prune(now)

    def failure(self, now: float) -> None:
        state = self.state(now)
        if state == HALF_OPEN or self._trial:
            self._open(now)
            return
        if state == OPEN:
            return  # a call let through before the breaker opened: the cooldown stands
        self._failures.append(now)
        self._prune(now)
        if len(self._failures) >= self.settings.failures:
            self._open(now)

    def release(self, now: float) -> None:
        """The call ended without a verdict: a half-open trial's slot is free again."""
        self._trial = False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._trial = False
        self._failures.clear()
        self.opened += 1

    def _close(self) -> None:
        self._opened_at = None
        self._trial = False
        self._failures.clear()

    def _prune(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.settings.window_s:
            self._failures.popleft()
