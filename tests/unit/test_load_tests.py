"""The load tests' pure parts: shapes end, SLO misses are named. (No test may import locust:
it gevent-patches the process, and Ray then hangs.)"""

from __future__ import annotations

import pytest

from load_tests.shapes import Schedule, schedule
from load_tests.slo import SLO, Figures, load, misses


def test_every_shape_ends_and_the_ramp_and_spike_have_their_form() -> None:
    ramp = schedule("ramp", peak=24, rate=4, duration_s=240, steps=8)
    assert [ramp.at(t)[0] for t in range(0, 240, 30)] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert ramp.at(240) is None
    spike = schedule("spike", peak=8, rate=2, duration_s=90)
    assert (spike.at(10), spike.at(45), spike.at(80), spike.at(90)) == ((2, 2), (8, 8.0), (2, 2), None)
    assert schedule("soak", 4, 1, None).duration_s == 600
    with pytest.raises(ValueError):
        Schedule("forever", 1, 1, 10)
    with pytest.raises(ValueError):
        Schedule("soak", 1, 1, 5 * 3600)  # a soak is bounded


def test_slo_misses_name_each_threshold_and_the_shipped_file_loads() -> None:
    slo = SLO(p95_ttft_ms=1000, p95_latency_ms=5000, max_error_rate=0.01, min_requests=10)
    good = Figures(requests=100, failures=1, p95_latency_ms=4000, p95_ttft_ms=900, ttft_count=99)
    assert misses(slo, good) == []
    bad = Figures(requests=100, failures=5, p95_latency_ms=6000, p95_ttft_ms=1200, ttft_count=95)
    found = misses(slo, bad)
    assert len(found) == 3 and "error rate 5.00%" in found[0] and "p95 TTFT 1200 ms" in found[1] and "p95 latency" in found[2]
    assert misses(slo, Figures(0, 0, 0, 0, 0)) == ["0 chat requests, fewer than the 10 required"]
    shipped = load()
    assert shipped.p95_ttft_ms > 0 and 0 <= shipped.max_error_rate < 1
