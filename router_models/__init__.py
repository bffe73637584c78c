"""Everything that decides *which model*: routers behind the RouterModel seam. No Ray, no HTTP."""

from __future__ import annotations

from cluster.config import RouterConfig
from cluster.protocols import RouterModel


def create_router_model(config: RouterConfig) -> RouterModel:
    """The router model the config names; the trained one arrives with its own issue."""
    if config.kind == "heuristic":
        from router_models.heuristic import HeuristicRouter

        return HeuristicRouter()
    from cluster.errors import ConfigError

    raise ConfigError(
        "the trained router is not available in this build",
        issues=(("router.kind", "kind 'trained' is not implemented yet; use 'heuristic'"),),
    )
