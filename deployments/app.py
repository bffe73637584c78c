"""The composition root: ``build_app(args)`` builds the whole deployment graph from a config.

This is the ``import_path`` (``deployments.app:build_app``) that a serveConfigV2 names;
``args`` holds exactly one of ``profile`` (local, gpu, sim), ``config_path`` (a YAML/JSON
file on the nodes) or ``config`` (the config inline, as KubeRay carries it).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ClusterConfig
from cluster.errors import ConfigError
from cluster.loader import resolve_config
from cluster.serve_config import GATEWAY_NAME, ROUTER_NAME, deployment_options
from cluster.types import deployment_name
from deployments.gateway.ingress import Gateway
from deployments.model_server import ModelServer
from deployments.router import Router

ARG_KEYS = ("profile", "config_path", "config")


def build_app(args: dict[str, Any] | None = None) -> Application:
    args = dict(args or {})
    unknown = sorted(set(args) - set(ARG_KEYS))
    if unknown:
        raise ConfigError("unknown build_app args", issues=tuple(("args", f"unknown key {k!r}; use one of {ARG_KEYS}") for k in unknown))
    cfg = resolve_config(profile=args.get("profile"), path=args.get("config_path"), inline=args.get("config"))
    return build_from_config(cfg)


def build_from_config(cfg: ClusterConfig) -> Application:
    """One ModelServer deployment per model version (but those that run in the gateway),
    one Router, one Gateway ingress."""
    models = {}
    for model, version in cfg.model_deployments():
        name = deployment_name(model.name, version.name)
        models[name] = (
            serve.deployment(ModelServer)
            .options(
                **deployment_options(name, version),
                max_queued_requests=version.max_queued_requests,
                # Model loading can take minutes on a cold node; health checks start after.
                health_check_period_s=10,
                health_check_timeout_s=30,
                graceful_shutdown_timeout_s=30,
            )
            .bind(model.name, version)
        )
    router = serve.deployment(Router).options(**deployment_options(ROUTER_NAME, cfg.router)).bind(cfg.router)
    return serve.deployment(Gateway).options(**deployment_options(GATEWAY_NAME, cfg.gateway)).bind(cfg, router, models)

