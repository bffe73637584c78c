"""Per-version serving figures that gateways record and a rollout's analysis reads.

Each gateway counts, per model version and per wall-clock second, the requests, the
server errors, latency and time-to-first-token histograms, and the quality gate's
verdicts. Histograms have fixed bounds, so the figures of many gateways and seconds add
up exactly, and a p95 over any interval is read from the merged counts (to the bucket's
upper bound, at most 12% above the true value with these bounds).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Mapping

# Upper bounds in seconds: 10 ms to about 2 minutes, 12% apart; one more bucket past it.
BOUNDS: tuple[float, ...] = tuple(round(0.01 * 1.12**i, 6) for i in range(84))


def bucket(value_s: float) -> int:
    return bisect.bisect_left(BOUNDS, value_s)


def quantile(counts: Mapping[int, int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile, or None without data."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return BOUNDS[index] if index < len(BOUNDS) else float("inf")
    return float("inf")


@dataclass
class Window:
    """One version's figures over some interval (one gateway-second, or merged)."""

    requests: int = 0
    errors: int = 0
    gated: int = 0
    escalated: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    ttft: dict[int, int] = field(default_factory=dict)

    def record(self, *, ok: bool, latency_s: float | None, ttft_s: float | None, gate_passed: bool | None) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        if latency_s is not None:
            b = bucket(latency_s)
            self.latency[b] = self.latency.get(b, 0) + 1
        if ttft_s is not None:
            b = bucket(ttft_s)
            self.ttft[b] = self.ttft.get(b, 0) + 1
        if gate_passed is not None:
            self.record_gate(gate_passed)

    def record_gate(self, passed: bool) -> None:
        self.gated += 1
        self.escalated += 0 if passed else 1

    def add(self, other: "Window") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.gated += other.gated
        self.escalated += other.escalated
        for mine, theirs in ((self.latency, other.latency), (self.ttft, other.ttft)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def to_fields(self) -> dict[str, int]:
        """Flat integer fields (a Redis hash that HINCRBY can add into)."""
        out = {"requests": self.requests, "errors": self.errors, "gated": self.gated, "escalated": self.escalated}
        out.update({f"lat:{k}": v for k, v in self.latency.items()})
        out.update({f"ttft:{k}": v for k, v in self.ttft.items()})
        return {k: v for k, v in out.items() if v}

    @staticmethod
    def from_fields(fields: Mapping[str, object]) -> "Window":
        w = Window()
        for key, raw in fields.items():
            value = int(raw)  # type: ignore[call-overload]
            if key.startswith("lat:"):
                w.latency[int(key[4:])] = value
            elif key.startswith("ttft:"):
                w.ttft[int(key[5:])] = value
            elif key in ("requests", "errors", "gated", "escalated"):
                setattr(w, key, value)
        return w

    @staticmethod
    def merged(windows: Iterable["Window"]) -> "Window":
        out = Window()
        for w in windows:
            out.add(w)
        return out

    def p95_latency_s(self) -> float | None:
        return quantile(self.latency, 0.95)

    def p95_ttft_s(self) -> float | None:
        return quantile(self.ttft, 0.95)
