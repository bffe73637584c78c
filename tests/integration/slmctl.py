"""Run the real ``slmctl`` against a real local Ray cluster on test ports (loopback only)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

# Outside Ray's default worker port range (10002-19999) and the usual 8000/8265/6379.
DASHBOARD_PORT = 28265
RAY_PORT = 26379
API_PORT = 28000
CLUSTER_FLAGS = ["--dashboard-port", str(DASHBOARD_PORT)]
UP_FLAGS = [*CLUSTER_FLAGS, "--ray-port", str(RAY_PORT), "--port", str(API_PORT)]


@dataclass
class Result:
    code: int
    out: str


def slmctl(*args: str, timeout_s: float = 600) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return Result(done.returncode, done.stdout + done.stderr)


def down() -> None:
    slmctl("down", *CLUSTER_FLAGS, timeout_s=120)
