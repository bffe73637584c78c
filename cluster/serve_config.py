"""Render the Serve config (the same shape as a RayService's serveConfigV2) from a cluster config."""

from __future__ import annotations

from typing import Any

from cluster.config import ClusterConfig

IMPORT_PATH = "deployments.app:build_app"
CONTROLLER_IMPORT_PATH = "autoscaling.app:build_controller"
CONTROLLER_APP = "slm-control"


def render_serve_config(cfg: ClusterConfig, *, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """The data plane as one application whose ``args`` carry the whole config inline, so
    the nodes need no file (``build_app`` rebuilds every deployment's options from it), and,
    when the config names a Redis, the control plane's rollout controller as a second
    application (no route: it serves no HTTP)."""
    inline = {"config": cfg.model_dump(mode="json")}
    apps: list[dict[str, Any]] = [{"name": cfg.name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": inline}]
    if cfg.redis.url is not None or cfg.redis.url_env is not None:
        apps.append({"name": CONTROLLER_APP, "route_prefix": None, "import_path": CONTROLLER_IMPORT_PATH, "args": inline})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host or cfg.gateway.host, "port": port or cfg.gateway.port},
        "applications": apps,
    }
