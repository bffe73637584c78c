"""Pure views of where replicas run, for ``slmctl status`` on a cluster of one node or many.

Inputs are the dashboard's own JSON: Serve's ``GET /api/serve/applications/`` (every
replica carries ``node_id`` and ``node_ip``) and ``GET /nodes?view=summary`` (every node's
id, address, head flag, state and logical resources). Nothing here talks to Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

SHORT_ID = 8  # as many hex digits of a node id as `slmctl status` shows


def short_id(node_id: str | None) -> str:
    return (node_id or "-")[:SHORT_ID]


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    is_head: bool
    state: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ReplicaPlacement:
    app: str
    deployment: str
    replica_id: str
    state: str
    node_id: str | None
    node_ip: str | None
    num_gpus: float
    num_cpus: float


def nodes_from_summary(summary: dict[str, Any]) -> list[NodeInfo]:
    """The nodes of ``/nodes?view=summary``, the head first, then by address and id."""
    out = []
    for node in (summary.get("data") or {}).get("summary") or []:
        raylet = node.get("raylet") or {}
        node_id = raylet.get("nodeId")
        if not node_id:
            continue
        total = raylet.get("resourcesTotal") or {}
        out.append(
            NodeInfo(
                node_id=node_id,
                ip=raylet.get("nodeManagerAddress") or node.get("ip") or "-",
                is_head=bool(raylet.get("isHeadNode")),
                state=raylet.get("state") or "UNKNOWN",
                cpus=float(total.get("CPU", 0)),
                gpus=float(total.get("GPU", 0)),
            )
        )
    return sorted(out, key=lambda n: (not n.is_head, n.ip, n.node_id))


def replica_placements(details: dict[str, Any]) -> list[ReplicaPlacement]:
    """Every replica of every application in Serve's details, with the node it runs on."""
    out = []
    for app_name, app in sorted((details.get("applications") or {}).items()):
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
            for rep in dep.get("replicas") or []:
                out.append(
                    ReplicaPlacement(
                        app=app_name,
                        deployment=dep_name,
                        replica_id=str(rep.get("replica_id") or "-"),
                        state=str(rep.get("state") or "UNKNOWN"),
                        node_id=rep.get("node_id") or None,
                        node_ip=rep.get("node_ip") or None,
                        num_gpus=float(options.get("num_gpus") or 0),
                        num_cpus=float(options.get("num_cpus") or 0),
                    )
                )
    return sorted(out, key=lambda r: (r.app, r.deployment, r.replica_id))


def replicas_table(replicas: Iterable[ReplicaPlacement], app: str) -> str:
    """One line per replica of ``app``: its state and the node (short id and IP) it runs on."""
    rows = [r for r in replicas if r.app == app]
    lines = [f"{'REPLICA':<32} {'STATE':<10} {'NODE':<{SHORT_ID}}  NODE IP"]
    for r in rows:
        lines.append(f"{f'{r.deployment}#{r.replica_id}':<32} {r.state:<10} {short_id(r.node_id):<{SHORT_ID}}  {r.node_ip or '-'}")
    if not rows:
        lines.append("(no replicas)")
    return "\n".join(lines)


def nodes_table(nodes: Iterable[NodeInfo], replicas: Iterable[ReplicaPlacement]) -> str:
    """One line per node: role, state, logical CPUs and GPUs, the GPU share its running
    replicas hold, and how many replicas run there. Replicas on a node the summary does
    not list (it died a moment ago) get a line of their own, so none goes unseen."""
    placed: dict[str, list[ReplicaPlacement]] = {}
    for r in replicas:
        if r.node_id and r.state == "RUNNING":
            placed.setdefault(r.node_id, []).append(r)
    known = list(nodes)
    lines = [f"{'NODE':<{SHORT_ID}}  {'IP':<15} {'ROLE':<6} {'STATE':<6} {'CPU':>5} {'GPU':>5} {'GPU USED':>8} {'REPLICAS':>8}"]
    for n in known:
        here = placed.pop(n.node_id, [])
        used = sum(r.num_gpus for r in here)
        role = "head" if n.is_head else "worker"
        lines.append(f"{short_id(n.node_id):<{SHORT_ID}}  {n.ip:<15} {role:<6} {n.state:<6} {n.cpus:>5g} {n.gpus:>5g} {used:>8.3g} {len(here):>8}")
    for node_id, here in sorted(placed.items()):
        used = sum(r.num_gpus for r in here)
        ip = here[0].node_ip or "-"
        lines.append(f"{short_id(node_id):<{SHORT_ID}}  {ip:<15} {'?':<6} {'?':<6} {'?':>5} {'?':>5} {used:>8.3g} {len(here):>8}")
    return "\n".join(lines)
