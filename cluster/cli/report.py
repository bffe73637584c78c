"""Pure views of Serve's status JSON (GET /api/serve/applications/) for the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config import ClusterConfig
from cluster.types import deployment_name

# Serve says this when a replica waits for resources the cluster does not have. (A slow
# model load says "taken more than 30s to initialize" instead: that is not this.)
_UNSCHEDULABLE_HINTS = ("to be scheduled", "resources required for each replica", "infeasible")


@dataclass(frozen=True)
class DeploymentRow:
    name: str
    status: str
    running: int
    target: int
    num_gpus: float
    num_cpus: float
    message: str

    @property
    def waiting_for_resources(self) -> bool:
        return any(h.lower() in self.message.lower() for h in _UNSCHEDULABLE_HINTS)


@dataclass(frozen=True)
class AppView:
    name: str
    status: str
    message: str
    rows: tuple[DeploymentRow, ...]


def app_view(details: dict[str, Any], app_name: str) -> AppView | None:
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        return None
    rows = []
    for name, dep in sorted((app.get("deployments") or {}).items()):
        options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
        replicas = dep.get("replicas") or []
        rows.append(
            DeploymentRow(
                name=name,
                status=dep.get("status", "UNKNOWN"),
                running=sum(1 for r in replicas if r.get("state") == "RUNNING"),
                target=int(dep.get("target_num_replicas") or 0),
                num_gpus=float(options.get("num_gpus") or 0),
                num_cpus=float(options.get("num_cpus") or 0),
                message=(dep.get("message") or "").strip(),
            )
        )
    return AppView(name=app_name, status=app.get("status", "UNKNOWN"), message=(app.get("message") or "").strip(), rows=tuple(rows))


def progress_line(view: AppView, elapsed_s: float) -> str:
    ready = sum(1 for r in view.rows if r.status == "HEALTHY")
    parts = ", ".join(f"{r.name} {r.running}/{r.target or '?'}" for r in view.rows if r.status != "HEALTHY")
    waiting = f"  waiting: {parts}" if parts else ""
    return f"[{elapsed_s:5.0f}s] {view.status}: {ready}/{len(view.rows)} deployments healthy{waiting}"


def status_table(view: AppView) -> str:
    header = f"{'DEPLOYMENT':<16} {'STATE':<12} {'REPLICAS':>8} {'GPU':>6} {'CPU':>6}  MESSAGE"
    lines = [f"application {view.name}: {view.status}" + (f" ({view.message})" if view.message else ""), header]
    for r in view.rows:
        msg = r.message.replace("\n", " ")
        if r.waiting_for_resources:
            msg = "WAITING FOR RESOURCES: " + msg
        lines.append(f"{r.name:<16} {r.status:<12} {f'{r.running}/{r.target}':>8} {r.num_gpus:>6g} {r.num_cpus:>6g}  {msg[:200]}")
    return "\n".join(lines)


def in_gateway_line(cfg: ClusterConfig) -> str | None:
    """The versions that run in the gateway (``runs_in: gateway``): Serve lists no deployment
    for them, so the status says where they are. None when there are none."""
    names = [deployment_name(m.name, v.name) for m, v in cfg.deployments() if v.runs_in == "gateway"]
    if not names:
        return None
    return f"in the gateway (runs_in: gateway; served by the gateway's replicas): {', '.join(names)}"
