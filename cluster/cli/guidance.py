"""What slmctl tells the operator: the banner after ``up``, the refusal to replace a running
application, and how to reach a Ray cluster that asks for a token. Pure: text from data."""

from __future__ import annotations

from typing import Any

from cluster.cli.ray_cluster import LocalCluster
from cluster.config import ClusterConfig


def ready_banner(cfg: ClusterConfig, host: str, port: int, cluster: LocalCluster) -> str:
    wildcard = host in ("0.0.0.0", "::")
    # Serve runs a proxy on every node with replicas; on a joined cluster the head's
    # address is the one this machine knows to reach.
    shown = (cluster.host if cluster.joined else "127.0.0.1") if wildcard else host
    base = f"http://{shown}:{port}"
    flag = f" --address {cluster.dashboard_url}" if cluster.joined else ""
    var = cfg.gateway.api_keys_env
    # The env var holds comma-separated keys: `${VAR%%,*}` is its first key in bash and sh.
    auth = f' -H "Authorization: Bearer ${{{var}%%,*}}"' if var else ""
    key_note = [f"  (sends the first of the comma-separated keys in ${var}; export it in this shell first)"] if var else []
    return "\n".join(
        [
            "",
            "slm-cluster is up.",
            f"  OpenAI API:    {base}/v1   (models: {base}/v1/models)",
            f"  Health:        {base}/healthz   {base}/readyz",
            f"  Ray dashboard: {cluster.dashboard_url}",
            *([] if cluster.joined else [f"  Metrics:       {cluster.metrics_url}   (Prometheus; docs/observability.md)"]),
            "",
            "Try it:",
            f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            """-d '{"model": "auto", "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}], "max_tokens": 64}'""",
            *key_note,
            "",
            f"slmctl status{flag}   # deployments, replicas, GPU fractions, the node of each replica",
            f"slmctl down{flag}     # "
            + ("delete the application (the cluster keeps running)" if cluster.joined else "delete the application, stop the Ray and Redis that up started"),
        ]
    )


def running_apps(details: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(application, its deployments) for each Serve application in the dashboard's
    ``GET /api/serve/applications/`` answer."""
    apps = details.get("applications") or {}
    return [(name, sorted((app.get("deployments") or {}).keys())) for name, app in sorted(apps.items())]


def replace_refusal(details: dict[str, Any], replace: bool) -> str | None:
    """Why ``slmctl up`` will not deploy over what runs, or None when it may.

    ``up`` PUTs a whole serve config, which replaces every application on the cluster (one
    it does not name is deleted), so anything running is replaced only when asked."""
    running = running_apps(details)
    if replace or not running:
        return None
    lines = ["Serve applications are already running on this cluster; `slmctl up` would replace them:"]
    for name, deployments in running:
        lines.append(f"  {name}: {len(deployments)} deployments ({', '.join(deployments) or 'none yet'})")
    lines.append(
        "Nothing was deployed. Pass --replace to replace them, `slmctl deploy --config FILE` to update the "
        "application in place, or `slmctl down` first."
    )
    return "\n".join(lines)


def ray_auth_lines(dashboard_url: str, token_source: str | None, required: bool) -> list[str]:
    """How to reach a Ray cluster with token authentication: the dashboard in a browser, and
    Ray's own CLI (``ray status``, ``serve status``), which both answer 401 without it."""
    if not required:
        return []
    where = token_source or "~/.ray/auth_token (not found here: copy it from the head node)"
    address = f"--address {dashboard_url}"
    return [
        f"Ray token auth is on: its token is in {where}.",
        f"  dashboard {dashboard_url}: paste the token when it asks (`ray get-auth-token` prints it)",
        f"  Ray's CLI: export RAY_AUTH_MODE=token  (and RAY_AUTH_TOKEN=... if the token is not in ~/.ray/auth_token), "
        f"then `ray status`, `serve status {address}`",
    ]
