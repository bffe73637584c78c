"""The LLM load signals a model-server replica reports to the autoscaler.

Engine-agnostic: counted where every generation passes (``ModelServer.generate``), so the
fake, hf, vLLM, SGLang and remote engines all report the same figures. The names are the
contract between the replica (``record_autoscaling_stats``) and the policy
(``autoscaling.serve_policy``), which is why they live in the kernel both import.

- ``slm_waiting``: generations accepted by this replica that have not produced their
  first token (queued in the engine or in prefill);
- ``slm_running``: generations that are decoding;
- ``slm_tokens_per_s``: completion tokens produced over the last ``window_s``;
- ``slm_ttft_p90_ms``: the 90th percentile of time to first token over the last
  ``window_s``, measured inside the replica (0 when no request started in the window).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Callable

WAITING = "slm_waiting"
RUNNING = "slm_running"
TOKENS_PER_S = "slm_tokens_per_s"
TTFT_P90_MS = "slm_ttft_p90_ms"
SIGNALS: tuple[str, ...] = (WAITING, RUNNING, TOKENS_PER_S, TTFT_P90_MS)


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Generation:
    """One generation's place in the tracker; handed back to ``first_token`` and ``finish``."""

    started: float
    first_token: bool = False
    tokens: int = 0
    done: bool = False


class LoadTracker:
    """Counts in-flight generations, tokens and TTFTs. Not thread-safe: one event loop."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.waiting = 0
        self.running = 0
        self._tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._ttfts: collections.deque[tuple[float, float]] = collections.deque()

    def start(self) -> Generation:
        self.waiting += 1
        return Generation(started=self.clock())

    def tokens(self, gen: Generation, count: int) -> None:
        """``count`` completion tokens arrived; the first ones also mark the first token."""
        if count <= 0 or gen.done:
            return
        now = self.clock()
        if not gen.first_token:
            gen.first_token = True
            self.waiting -= 1
            self.running += 1
            self._ttfts.append((now, (now - gen.started) * 1000))
        gen.tokens += count
        self._tokens.append((now, count))

    def finish(self, gen: Generation, completion_tokens: int | None = None) -> None:
        """The generation ended (done, failed or aborted). ``completion_tokens`` from the
        engine's usage tops up tokens the stream did not show one by one. Idempotent."""
        if gen.done:
            return
        if completion_tokens is not None and completion_tokens > gen.tokens:
            # Counted for tokens/s only: a generation that showed no text one token at a time
            # has no first-token time to report (its end is not one).
            self._tokens.append((self.clock(), completion_tokens - gen.tokens))
            gen.tokens = completion_tokens
        gen.done = True
        if gen.first_token:
            self.running -= 1
        else:
            self.waiting -= 1

    def snapshot(self) -> dict[str, float]:
        """The four signals now (see the module docstring)."""
        now = self.clock()
        horizon = now - self.window_s
        while self._tokens and self._tokens[0][0] < horizon:
            self._tokens.popleft()
        while self._ttfts and self._ttfts[0][0] < horizon:
            self._ttfts.popleft()
        return {
            WAITING: float(self.waiting),
            RUNNING: float(self.running),
            TOKENS_PER_S: sum(n for _, n in self._tokens) / self.window_s,
            TTFT_P90_MS: quantile([ms for _, ms in self._ttfts], 0.9),
        }
