"""Render the Serve config (the same shape as a RayService's serveConfigV2) from a cluster config."""

from __future__ import annotations

from typing import Any

from cluster.config import ClusterConfig, GatewayConfig, ModelVersionConfig, RouterConfig
from cluster.types import deployment_name

IMPORT_PATH = "deployments.app:build_app"

# Serve's proxy loads these middlewares before its own request-id handling, which 500s on a
# non-UTF-8 x-request-id and echoes any id raw (deployments/gateway/proxy_ids.py says why).
# `slmctl up` and the rendered RayService set the variable on every Ray node (a proxy runs on
# each). A string: the kernel does not import the data plane; a unit test holds it to the module.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "deployments.gateway.proxy_ids:middlewares"
CONTROLLER_IMPORT_PATH = "autoscaling.app:build_controller"
CONTROLLER_APP = "slm-control"
ROUTER_NAME = "router"
GATEWAY_NAME = "gateway"


def deployment_options(name: str, block: ModelVersionConfig | RouterConfig | GatewayConfig) -> dict[str, Any]:
    """The Serve options every deployment takes from its config block: one copy, read by
    ``build_app`` (in code) and by the manifests (the serveConfigV2 ``deployments:`` list)."""
    return {
        "name": name,
        "ray_actor_options": block.resources.ray_actor_options(),
        "autoscaling_config": block.autoscaling.serve_options(),
        "max_ongoing_requests": block.max_ongoing_requests,
    }


def data_plane_deployments(cfg: ClusterConfig) -> list[dict[str, Any]]:
    """Every model deployment's options (not the versions that run in the gateway), then the router's and the gateway's."""
    out = [deployment_options(deployment_name(m.name, v.name), v) for m, v in cfg.model_deployments()]
    out.append(deployment_options(ROUTER_NAME, cfg.router))
    out.append(deployment_options(GATEWAY_NAME, cfg.gateway))
    return out


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
