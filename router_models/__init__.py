"""Everything that decides *which model*: routers behind the RouterModel seam. No Ray, no HTTP."""

from __future__ import annotations

from cluster.config import RouterConfig
from cluster.protocols import RouterModel


def create_router_model(config: RouterConfig) -> RouterModel:
    """The router model the config names: the trained micro-model (the shipped default
    artifact when ``artifact_path`` is null) or the keyword heuristic fallback."""
    if config.kind == "heuristic":
        from router_models.heuristic import HeuristicRouter

        return HeuristicRouter()
    from router_models.trained import TrainedRouter

    return TrainedRouter(config.artifact_path, threshold=config.escalation_threshold, threads=config.torch_threads)
