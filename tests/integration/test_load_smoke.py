"""CI smoke run of the locust load test (load_tests/): 20 s of streamed ShareGPT chat
traffic, mixed strategies and data classes, against the ``sim`` profile on a real local
Ray + Serve, over HTTP on a free loopback port. Checks that locust exits 0 under loose
SLOs, that its CSVs hold chat and TTFT rows with requests and no failures, and that the
HTML report and the capacity PNG were written."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
# Looked up, never imported: importing locust monkey-patches this process with gevent, and
# Ray's threads then hang. Locust runs in its own process below.
if importlib.util.find_spec("locust") is None or importlib.util.find_spec("matplotlib") is None:
    pytest.skip("locust and matplotlib are not installed (the dev extra has them)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
LOOSE_SLO = "p95_ttft_ms: 20000\np95_latency_ms: 40000\nmax_error_rate: 0.0\nmin_requests: 5\n"


@pytest.fixture(scope="module")
def sim_url(ray_local: dict) -> str:  # noqa: F811
    from ray import serve

    from cluster.loader import load_profile
    from deployments.app import build_from_config

    serve.run(build_from_config(load_profile("sim")), name="sim", route_prefix="/")
    url = ray_local["base_url"]
    # One answer before the clock starts: the router's first batch loads its embedder.
    body = {"model": "auto", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    return url


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_locust_smoke_run(sim_url: str, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text(LOOSE_SLO)
    prefix = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "locust", "--headless", "-f", str(ROOT / "load_tests" / "locustfile.py"),
        "--host", sim_url, "-u", "4", "-r", "2", "-t", "20s",
        "--csv", str(prefix), "--csv-full-history", "--html", str(tmp_path / "run.html"),
        "--only-summary", "--loglevel", "WARNING", "--slo", str(slo),
        "--strategy-mix", "route=0.6,cascade=0.2,race=0.2", "--data-class-mix", "public=0.8,internal=0.1,restricted=0.1",
        "--request-timeout", "30",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "SLO check:" in out and "SLO missed" not in out, out[-3000:]

    stats = {(r["Type"], r["Name"]): r for r in _rows(Path(f"{prefix}_stats.csv"))}
    chat = [r for (kind, _), r in stats.items() if kind == "CHAT"]
    ttft = [r for (kind, _), r in stats.items() if kind == "TTFT"]
    assert chat and ttft, sorted(stats)
    assert sum(int(r["Request Count"]) for r in chat) >= 5
    assert sum(int(r["Request Count"]) for r in ttft) >= 5
    assert all(int(r["Failure Count"]) == 0 for r in chat), chat
    assert {name for kind, name in stats if kind == "CHAT"} <= {"route", "cascade", "race"}
    assert ("TTFT", "all") in stats  # every strategy together, for the plot
    assert any(kind == "ITL" for kind, _ in stats) and any(kind == "TPS" for kind, _ in stats)
    assert not _rows(Path(f"{prefix}_failures.csv"))

    history = _rows(Path(f"{prefix}_stats_history.csv"))
    assert any(r["Type"] == "TTFT" for r in history)
    assert (tmp_path / "run.html").stat().st_size > 0
    png = Path(f"{prefix}_capacity.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
