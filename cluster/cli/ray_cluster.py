"""The one wrapper around a local Ray cluster: ``ray start/stop`` and the dashboard's Serve REST API.

Deploying through the dashboard (PUT /api/serve/applications/) is what ``serve deploy``
and KubeRay do, so ``slmctl up`` exercises the production path, and it returns at once,
which lets the CLI show progress while models load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import httpx


class RayClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalCluster:
    dashboard_port: int = 8265
    ray_port: int = 6379
    host: str = "127.0.0.1"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

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
        if self.dashboard_up():
            return False
        cmd = [
            self._ray_bin(), "start", "--head",
            f"--port={self.ray_port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--disable-usage-stats",
        ]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus:g}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus:g}")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        if throughput_optimized:
            env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RayClusterError(f"ray start failed:\n{done.stdout}\n{done.stderr}")
        return True

    def stop(self) -> None:
        subprocess.run([self._ray_bin(), "stop", "--force"], capture_output=True, text=True)

    @staticmethod
    def _auth_headers() -> dict[str, str]:
        # Ray 2.5x+ enables token auth by default; `ray start` writes the token here.
        token = os.environ.get("RAY_AUTH_TOKEN")
        path = os.path.expanduser("~/.ray/auth_token")
        if not token and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

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

    def resources(self) -> tuple[float, float]:
        """(total logical CPUs, total GPUs) of the cluster, from its nodes' resources."""
        resp = self._request("GET", "/nodes?view=summary")
        if resp.status_code >= 400:
            raise RayClusterError(f"cannot read cluster resources ({resp.status_code})")
        cpus = gpus = 0.0
        for node in resp.json().get("data", {}).get("summary", []):
            raylet = node.get("raylet", {})
            if raylet.get("state", "ALIVE") != "ALIVE":
                continue
            total = raylet.get("resourcesTotal", {})
            cpus += float(total.get("CPU", 0))
            gpus += float(total.get("GPU", 0))
        return cpus, gpus
