"""The one wrapper around a Ray cluster: ``ray start/stop`` and the dashboard's REST API.

Deploying through the dashboard (PUT /api/serve/applications/) is what ``serve deploy``
and KubeRay do, so ``slmctl up`` exercises the production path, and it returns at once,
which lets the CLI show progress while models load.

A cluster is either local (``slmctl up`` may start its head node on this machine) or
joined (``--address``: someone else's head, perhaps with many nodes, reached through its
dashboard URL, which slmctl never starts nor stops). ``slmctl up`` leaves a marker with the
head node's id when it starts Ray, so that ``slmctl down`` stops only a Ray it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from cluster.cli import embedded_redis
from cluster.serve_config import PROXY_CALLBACK, PROXY_CALLBACK_ENV




class RayClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalCluster:
    dashboard_port: int = 8265
    ray_port: int = 6379
    host: str = "127.0.0.1"
    joined: bool = False  # reached with --address: not ours to start or stop
    metrics_port: int = 8080  # Prometheus scrape port of the node's metrics agent (ray start --metrics-export-port)

    @classmethod
    def at_address(cls, address: str) -> "LocalCluster":
        """A running cluster named by its dashboard URL (``http://10.0.0.5:8265``, or
        ``10.0.0.5:8265``), as ``serve deploy --address`` and ``slmctl canary --address`` take it."""
        parsed = urlsplit(address if "://" in address else f"http://{address}")
        try:
            port = parsed.port or 8265
        except ValueError:
            port = None
        if not parsed.hostname or port is None or parsed.scheme not in ("http", "https") or parsed.path not in ("", "/"):
            raise RayClusterError(f"--address must be a Ray dashboard URL such as http://10.0.0.5:8265, got {address!r}")
        return cls(dashboard_port=port, host=parsed.hostname, joined=True)

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.ray_port}"

    def _ray_bin(self) -> str:
        beside = os.path.join(os.path.dirname(sys.executable), "ray")
        return beside if os.path.exists(beside) else (shutil.which("ray") or "ray")

    def dashboard_up(self) -> bool:
        try:
            return httpx.get(f"{self.dashboard_url}/api/version", timeout=2, headers=self._auth_headers()).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, *, num_cpus: float | None, num_gpus: float | None, throughput_optimized: bool = True) -> bool:
        """Start a head node unless one answers already; True when this call started it.

        ``throughput_optimized`` sets Ray's own RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for every
        process of the node (handle routing on the caller's loop, direct ingress, gRPC
        between replicas); docs/benchmarks.md shows what it buys on this path.
        """
        if self.joined:
            raise RayClusterError("a joined cluster (--address) is started by its owner, never by slmctl")
        if self.dashboard_up():
            return False
        cmd = [
            self._ray_bin(), "start", "--head",
            f"--port={self.ray_port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--disable-usage-stats",
            f"--metrics-export-port={self.metrics_port}",
        ]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus:g}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus:g}")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # an operator's own callback wins
        if throughput_optimized:
            env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RayClusterError(f"ray start failed:\n{done.stdout}\n{done.stderr}")
        self._marker().parent.mkdir(parents=True, exist_ok=True)
        self._marker().write_text(self._wait_for_head_id() or "", encoding="utf-8")
        return True

    def _wait_for_head_id(self, timeout_s: float = 20.0) -> str | None:
        """The dashboard answers a few seconds after ``ray start`` returns; an empty marker
        would later count any Ray on this port as ours, so wait for the head's id."""
        deadline = time.monotonic() + timeout_s
        while True:
            head = self._head_id()
            if head or time.monotonic() >= deadline:
                return head
            time.sleep(0.5)

    def stop(self) -> None:
        if self.joined:
            raise RayClusterError("a joined cluster (--address) is stopped by its owner, never by slmctl")
        subprocess.run([self._ray_bin(), "stop", "--force"], capture_output=True, text=True)
        self._marker().unlink(missing_ok=True)

    # --- who started it -------------------------------------------------------------------

    def _marker(self) -> Path:
        return embedded_redis.state_dir(self.dashboard_port).parent / "ray-started-by-slmctl"

    def _head_id(self) -> str | None:
        try:
            return next((n["raylet"]["nodeId"] for n in self.nodes() if (n.get("raylet") or {}).get("isHeadNode")), None)
        except (RayClusterError, KeyError):
            return None

    def started_by_slmctl(self) -> bool:
        """Whether ``slmctl up`` started the Ray that runs here: its marker names this head
        node (or the dashboard is gone, so the marker is all there is to go by). Never for
        a joined cluster."""
        if self.joined:
            return False
        try:
            marked = self._marker().read_text(encoding="utf-8").strip()
        except OSError:
            return False
        head = self._head_id() if self.dashboard_up() else None
        return not marked or head is None or head == marked

    @staticmethod
    def token_source() -> str | None:
        """Where Ray's token comes from, as Ray's own clients look: ``RAY_AUTH_TOKEN``, the
        file ``RAY_AUTH_TOKEN_PATH`` names, else ``~/.ray/auth_token`` (``ray start`` writes
        it); None when there is none."""
        if os.environ.get("RAY_AUTH_TOKEN"):
            return "$RAY_AUTH_TOKEN"
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        return path if os.path.exists(path) else None

    @classmethod
    def _auth_headers(cls) -> dict[str, str]:
        # Ray 2.5x+ enables token auth by default; `ray start` writes the token.
        source, token = cls.token_source(), None
        if source == "$RAY_AUTH_TOKEN":
            token = os.environ["RAY_AUTH_TOKEN"]
        elif source is not None:
            with open(source, encoding="utf-8") as f:
                token = f.read().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def token_auth_required(self) -> bool:
        """Whether the dashboard refuses a request without a token (then so do `ray status`
        and `serve status` until the user sets RAY_AUTH_MODE=token)."""
        try:
            return httpx.get(f"{self.dashboard_url}/api/version", timeout=2).status_code == 401
        except httpx.HTTPError:
            return False

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return httpx.request(method, f"{self.dashboard_url}{path}", timeout=30, headers=self._auth_headers(), **kwargs)
        except httpx.HTTPError as err:
            raise RayClusterError(f"cannot reach the Ray dashboard at {self.dashboard_url}: {err}") from None

    def deploy(self, serve_config: dict[str, Any]) -> None:
        resp = self._request("PUT", "/api/serve/applications/", json=serve_config)
        if resp.status_code >= 400:
            raise RayClusterError(f"deploy refused ({resp.status_code}): {resp.text}")

    def serve_details(self) -> dict[str, Any]:
        resp = self._request("GET", "/api/serve/applications/")
        if resp.status_code >= 400:
            raise RayClusterError(f"cannot read Serve status ({resp.status_code}): {resp.text}")
        return resp.json()

    def delete_applications(self) -> None:
        self._request("DELETE", "/api/serve/applications/")

    def node_summary(self) -> dict[str, Any]:
        """The dashboard's ``/nodes?view=summary``: every node's id, address, head flag,
        state and logical resources (``cluster.cli.nodes`` reads it)."""
        resp = self._request("GET", "/nodes?view=summary")
        if resp.status_code >= 400:
            raise RayClusterError(f"cannot read the cluster's nodes ({resp.status_code})")
        return resp.json()

    def nodes(self) -> list[dict[str, Any]]:
        return list((self.node_summary().get("data") or {}).get("summary") or [])

    def resources(self) -> tuple[float, float]:
        """(total logical CPUs, total GPUs) of the cluster's live nodes."""
        cpus = gpus = 0.0
        for node in self.nodes():
            raylet = node.get("raylet", {})
            if raylet.get("state", "ALIVE") != "ALIVE":
                continue
            total = raylet.get("resourcesTotal", {})
            cpus += float(total.get("CPU", 0))
            gpus += float(total.get("GPU", 0))
        return cpus, gpus
