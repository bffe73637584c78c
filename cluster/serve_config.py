"""Render the Serve config (the same shape as a RayService's serveConfigV2) from a cluster config."""

from __future__ import annotations

from typing import Any

from cluster.config import ClusterConfig

IMPORT_PATH = "deployments.app:build_app"


def render_serve_config(cfg: ClusterConfig, *, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """One application whose ``args`` carry the whole config inline, so the nodes need no
    file: ``build_app`` rebuilds every deployment's options from it."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host or cfg.gateway.host, "port": port or cfg.gateway.port},
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"config": cfg.model_dump(mode="json")},
            }
        ],
    }
