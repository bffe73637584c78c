"""SLO thresholds of a load run (``slo.yaml``) and the check a headless run ends with.

The figures are over the whole run, every strategy and data class together: chat requests
(type ``CHAT``: whole streamed answers) for latency and the error rate, ``TTFT`` events for
the time to the first token. Percentiles come from locust's own response-time histograms,
merged exactly across entries (not averaged percentiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHAT, TTFT, ITL, TPS = "CHAT", "TTFT", "ITL", "TPS"
ALL = "all"  # the name of the copy of each TTFT event that sums every strategy; merges skip it
DEFAULT_FILE = Path(__file__).resolve().parent / "slo.yaml"
KEYS = ("p95_ttft_ms", "p95_latency_ms", "max_error_rate", "min_requests")


@dataclass(frozen=True)
class SLO:
    p95_ttft_ms: float
    p95_latency_ms: float
    max_error_rate: float
    min_requests: int = 1


def load(path: str | Path | None = None) -> SLO:
    data = yaml.safe_load(Path(path or DEFAULT_FILE).read_text()) or {}
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown SLO keys {unknown}; use {list(KEYS)}")
    return SLO(**data)


@dataclass(frozen=True)
class Figures:
    requests: int
    failures: int
    p95_latency_ms: float
    p95_ttft_ms: float
    ttft_count: int

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def merged(stats: Any, request_type: str) -> Any:
    """One locust StatsEntry holding every entry of this request type (``all`` copies skipped)."""
    from locust.stats import StatsEntry

    total = StatsEntry(stats, request_type, request_type, use_response_times_cache=False)
    for (name, method), entry in stats.entries.items():
        if method == request_type and name != ALL:
            total.extend(entry)
    return total


def figures(stats: Any) -> Figures:
    chat, ttft = merged(stats, CHAT), merged(stats, TTFT)
    return Figures(
        requests=chat.num_requests,
        failures=chat.num_failures,
        p95_latency_ms=float(chat.get_response_time_percentile(0.95) or 0) if chat.num_requests else 0.0,
        p95_ttft_ms=float(ttft.get_response_time_percentile(0.95) or 0) if ttft.num_requests else 0.0,
        ttft_count=ttft.num_requests,
    )


def misses(slo: SLO, fig: Figures) -> list[str]:
    """Each SLO the run missed, as a sentence; empty when it met them all."""
    out = []
    if fig.requests < slo.min_requests:
        out.append(f"{fig.requests} chat requests, fewer than the {slo.min_requests} required")
    if fig.error_rate > slo.max_error_rate:
        out.append(f"error rate {fig.error_rate:.2%} over {slo.max_error_rate:.2%}")
    if fig.p95_ttft_ms > slo.p95_ttft_ms:
        out.append(f"p95 TTFT {fig.p95_ttft_ms:.0f} ms over {slo.p95_ttft_ms:.0f} ms")
    if fig.ttft_count == 0 and fig.requests > fig.failures:
        out.append("no TTFT was recorded for the successful requests")
    if fig.p95_latency_ms > slo.p95_latency_ms:
        out.append(f"p95 latency {fig.p95_latency_ms:.0f} ms over {slo.p95_latency_ms:.0f} ms")
    return out


def report(slo: SLO, fig: Figures) -> str:
    return (f"SLO check: {fig.requests} chat requests, {fig.failures} failed ({fig.error_rate:.2%} / max {slo.max_error_rate:.2%}); "
            f"p95 TTFT {fig.p95_ttft_ms:.0f} ms / {slo.p95_ttft_ms:.0f}; p95 latency {fig.p95_latency_ms:.0f} ms / {slo.p95_latency_ms:.0f}")
