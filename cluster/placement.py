"""Will a config's replicas fit a Ray cluster? A pure check, run before deploying.

Ray packs fractional GPUs onto one physical GPU only while their fractions sum to at most
1, so GPU demand is bin-packed (first-fit decreasing) rather than summed.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import ClusterConfig
from cluster.types import deployment_name

_EPS = 1e-9


@dataclass(frozen=True)
class ReplicaDemand:
    deployment: str
    replicas: int
    num_cpus: float
    num_gpus: float


def replica_demands(cfg: ClusterConfig) -> list[ReplicaDemand]:
    """What the initial replicas of every deployment ask for."""
    out = []
    for model, version in cfg.model_deployments():
        auto = version.autoscaling.serve_options()
        out.append(
            ReplicaDemand(deployment_name(model.name, version.name), auto["initial_replicas"], version.resources.num_cpus, version.resources.num_gpus)
        )
    for name, block in (("router", cfg.router), ("gateway", cfg.gateway)):
        auto = block.autoscaling.serve_options()
        out.append(ReplicaDemand(name, auto["initial_replicas"], block.resources.num_cpus, block.resources.num_gpus))
    return out


def pack_gpus(fractions: list[float], gpus: int) -> list[float] | None:
    """First-fit decreasing: the load of each GPU, or None when some replica finds no room.
    Replicas asking for a whole number of GPUs take that many empty GPUs."""
    load = [0.0] * gpus
    for need in sorted(fractions, reverse=True):
        if need >= 1:
            whole = int(round(need))
            free = [i for i, used in enumerate(load) if used <= _EPS]
            if len(free) < whole:
                return None
            for i in free[:whole]:
                load[i] = 1.0
            continue
        for i, used in enumerate(load):
            if used + need <= 1 + _EPS:
                load[i] = used + need
                break
        else:
            return None
    return load


def fit_problems(cfg: ClusterConfig, available_cpus: float, available_gpus: float) -> list[str]:
    """Human-readable reasons the initial replicas cannot all be placed; empty when they fit."""
    demands = replica_demands(cfg)
    problems = []
    cpus = sum(d.replicas * d.num_cpus for d in demands)
    if cpus > available_cpus + _EPS:
        problems.append(f"CPU: the initial replicas need {cpus:g} logical CPUs; the cluster has {available_cpus:g}")
    fractions = [d.num_gpus for d in demands for _ in range(d.replicas) if d.num_gpus > 0]
    if fractions and pack_gpus(fractions, int(available_gpus + _EPS)) is None:
        wanted = ", ".join(f"{d.deployment}={d.replicas}x{d.num_gpus:g}" for d in demands if d.num_gpus > 0)
        problems.append(
            f"GPU: replicas needing {sum(fractions):g} GPUs ({wanted}) cannot be packed onto the cluster's {available_gpus:g} GPU(s)"
        )
    return problems
