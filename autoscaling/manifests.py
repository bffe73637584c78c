"""KubeRay manifests rendered from a cluster config and a capacity plan: pure data, no I/O.

``render_objects(cfg, plan)`` gives the Kubernetes objects of one slm-cluster as plain
dicts: a ``RayService`` (``ray.io/v1``) whose ``serveConfigV2`` is the config's serve config
(``cluster.serve_config``) with an explicit ``deployments:`` section, Services for the
gateway and the Ray dashboard, an in-cluster Redis (a StatefulSet and its Service) unless
the config names an external ``redis.url``, and a ``PodMonitor`` for Prometheus.
``autoscaling.k8s_cli`` lays them out as a kustomize tree.

Secrets are never rendered: every env var the config names for a secret (the gateway's API
keys, a remote model's API key, the Redis password) is read from one Secret by
``secretKeyRef`` (key = the env var's name), which the operator creates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from autoscaling.gpus import gpu_type as lookup_gpu
from autoscaling.planner import Plan, WorkerGroup
from cluster.config import ClusterConfig
from cluster.errors import SLMError
from cluster.serve_config import IMPORT_PATH, PROXY_CALLBACK, PROXY_CALLBACK_ENV, data_plane_deployments, render_serve_config

IMAGE = "ghcr.io/slm-cluster/slm-cluster"
IMAGE_TAG = "0.1.0"
RAY_VERSION = "2.60.0"
REDIS_IMAGE = "redis:7"
REDIS_PORT = 6379
REDIS_URL_ENV = "SLM_REDIS_URL"  # set when the config names no Redis env var of its own
DASHBOARD_PORT = 8265
METRICS_PORT = 8080  # KubeRay's default --metrics-export-port, on head and workers
PART_OF = "slm-cluster"

# The head runs the GCS, the dashboard, Serve's controller and a proxy, no replica.
HEAD_CPUS, HEAD_MEMORY_GIB = 2, 8
SHM_GIB = 8  # /dev/shm for Ray's object store and vLLM's workers
# Ray's object store lives in /dev/shm; its default (30% of the pod's memory) would outgrow
# the emptyDir above on large pods, so it is pinned below the shm size.
OBJECT_STORE_BYTES = str(6 * 1024**3)
# Ray's scheduler does not follow the planner's first-fit packing of fractional GPUs, so a
# GPU group may fragment onto one pod more than the plan's; the autoscaler may add it.
SPARE_GPU_PODS = 1
# GPU pods take minutes to come up; do not give them back after a short lull.
AUTOSCALER_IDLE_TIMEOUT_S = 300


class DoesNotFitError(SLMError):
    """The plan leaves deployments unplaced, so no manifest could run them."""

    http_status = 400
    error_type = "invalid_request_error"
    default_code = "plan_does_not_fit"


@dataclass(frozen=True)
class RenderOptions:
    name: str = "slm"  # the RayService's name and the prefix of every other object
    image: str = f"{IMAGE}:{IMAGE_TAG}"
    secret_name: str = "slm-secrets"


# --- the serve config ---------------------------------------------------------------


def k8s_config(cfg: ClusterConfig) -> ClusterConfig:
    """The config as it runs on Kubernetes: a config that names no Redis gets the in-cluster
    one through ``SLM_REDIS_URL`` (the Kubernetes counterpart of ``slmctl up``'s embedded
    Redis), so traffic splits and the rollout controller work there too."""
    if cfg.redis.url is not None or cfg.redis.url_env is not None:
        return cfg
    return cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"url_env": REDIS_URL_ENV})})


def serve_config(cfg: ClusterConfig) -> dict[str, Any]:
    """``render_serve_config`` bound to all interfaces, with the data plane's deployments listed."""
    rendered = render_serve_config(cfg, host="0.0.0.0")
    for app in rendered["applications"]:
        if app["import_path"] == IMPORT_PATH:
            app["deployments"] = data_plane_deployments(cfg)
    return rendered


class _NoAliases(yaml.SafeDumper):
    """Both applications carry the same inline config; write it out twice, not as an anchor."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def serve_config_text(cfg: ClusterConfig) -> str:
    """The serveConfigV2 string: ``serve_config(cfg)`` as YAML."""
    return yaml.dump(serve_config(cfg), Dumper=_NoAliases, sort_keys=False)


# --- pods --------------------------------------------------------------------------


def _labels(opts: RenderOptions, component: str) -> dict[str, str]:
    # Not app.kubernetes.io/name: KubeRay sets that one on the pods it creates.
    return {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/instance": opts.name, "app.kubernetes.io/component": component}


def redis_service_name(opts: RenderOptions) -> str:
    return f"{opts.name}-redis"


def in_cluster_redis(cfg: ClusterConfig) -> bool:
    """An in-cluster Redis unless the config names an external URL."""
    return cfg.redis.url is None


def secret_env_names(cfg: ClusterConfig) -> list[str]:
    """Env vars the config names for secrets, in a stable order."""
    names: list[str] = []
    if cfg.gateway.api_keys_env:
        names.append(cfg.gateway.api_keys_env)
    for _, version in cfg.deployments():
        key_env = getattr(version.engine, "api_key_env", None)
        if key_env:
            names.append(key_env)
    if cfg.redis.password_env:
        names.append(cfg.redis.password_env)
    return list(dict.fromkeys(names))


def ray_env(cfg: ClusterConfig, opts: RenderOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": PROXY_CALLBACK_ENV, "value": PROXY_CALLBACK}]  # safe x-request-id in every proxy
    if in_cluster_redis(cfg) and cfg.redis.url_env:
        env.append({"name": cfg.redis.url_env, "value": f"redis://{redis_service_name(opts)}:{REDIS_PORT}/0"})
    for name in secret_env_names(cfg):
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": name, "optional": True}}})
    return env


def _resources(cpus: float, memory_gib: float, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, str] = {"cpu": _quantity(cpus), "memory": f"{_quantity(memory_gib)}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _quantity(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _pod_template(cfg: ClusterConfig, opts: RenderOptions, *, container: str, ports: list[dict[str, Any]],
                  resources: dict[str, Any], extra_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{
            "name": container,
            "image": opts.image,
            "imagePullPolicy": "IfNotPresent",
            "ports": ports,
            "env": ray_env(cfg, opts),
            "resources": resources,
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GIB}Gi"}}],
    }
    spec.update(extra_spec or {})
    return {"metadata": {"labels": _labels(opts, "ray")}, "spec": spec}


def head_group(cfg: ClusterConfig, opts: RenderOptions) -> dict[str, Any]:
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": DASHBOARD_PORT},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": cfg.gateway.port},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    return {
        # num-cpus 0: no replica is ever scheduled on the head; losing it then loses no model.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "object-store-memory": OBJECT_STORE_BYTES},
        "template": _pod_template(cfg, opts, container="ray-head", ports=ports, resources=_resources(HEAD_CPUS, HEAD_MEMORY_GIB)),
    }


def worker_group(cfg: ClusterConfig, opts: RenderOptions, group: WorkerGroup) -> dict[str, Any]:
    ports = [{"name": "serve", "containerPort": cfg.gateway.port}, {"name": "metrics", "containerPort": METRICS_PORT}]
    params = {"num-cpus": str(group.cpus_per_pod), "object-store-memory": OBJECT_STORE_BYTES}
    extra: dict[str, Any] = {}
    if group.gpu_type is not None:
        params["num-gpus"] = str(group.gpus_per_pod)
        extra = {
            # The label NVIDIA's GPU feature discovery sets; adapt it to your nodes (docs/kubernetes.md).
            "nodeSelector": {"nvidia.com/gpu.product": _product_label(group.gpu_type)},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    resources = _resources(group.cpus_per_pod, group.memory_gib_per_pod, group.gpus_per_pod if group.gpu_type else 0)
    return {
        "groupName": group.name,
        "replicas": group.min_pods,
        "minReplicas": group.min_pods,
        "maxReplicas": group.max_pods + (SPARE_GPU_PODS if group.gpu_type is not None else 0),
        "rayStartParams": params,
        "template": _pod_template(cfg, opts, container="ray-worker", ports=ports, resources=resources, extra_spec=extra),
    }


def _product_label(name: str) -> str:
    try:
        return lookup_gpu(name).product_label
    except ValueError:
        return name


# --- objects -----------------------------------------------------------------------


def check_plan(plan: Plan) -> None:
    if plan.unplaced:
        lines = "; ".join(f"{u.deployment}: {u.reason}" for u in plan.unplaced)
        raise DoesNotFitError(f"the plan cannot place {len(plan.unplaced)} deployment(s), so nothing was rendered: {lines}")


def rayservice(cfg: ClusterConfig, plan: Plan, opts: RenderOptions) -> dict[str, Any]:
    """The RayService; ``cfg`` should already be ``k8s_config(cfg)``."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": opts.name, "labels": _labels(opts, "ray")},
        "spec": rayservice_spec(cfg, plan, opts),
    }


def rayservice_spec(cfg: ClusterConfig, plan: Plan, opts: RenderOptions) -> dict[str, Any]:
    """The RayService's spec; ``DoesNotFitError`` when the plan leaves anything unplaced."""
    check_plan(plan)
    return {
        # Image or node-group changes bring up a whole new cluster and switch traffic when it
        # serves; serveConfigV2 changes are applied in place (KubeRay's two update paths).
        "upgradeStrategy": {"type": "NewCluster"},
        "serveConfigV2": serve_config_text(cfg),
        "rayClusterConfig": {
            "rayVersion": RAY_VERSION,
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": AUTOSCALER_IDLE_TIMEOUT_S},
            "headGroupSpec": head_group(cfg, opts),
            "workerGroupSpecs": [worker_group(cfg, opts, g) for g in plan.worker_groups],
        },
    }


def services(cfg: ClusterConfig, opts: RenderOptions) -> list[dict[str, Any]]:
    """Our own stable names for the gateway (every pod whose Serve proxy is ready: KubeRay
    labels it ``ray.io/serve=true``) and the dashboard (the head)."""
    ray = _labels(opts, "ray")
    port = cfg.gateway.port
    return [
        _service(f"{opts.name}-gateway", ray, {**ray, "ray.io/serve": "true"}, [{"name": "http", "port": port, "targetPort": port}]),
        _service(f"{opts.name}-dashboard", ray, {**ray, "ray.io/node-type": "head"},
                 [{"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": DASHBOARD_PORT}]),
    ]


def _service(name: str, labels: dict[str, str], selector: dict[str, str], ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"type": "ClusterIP", **spec, "selector": selector, "ports": ports},
    }


def redis_objects(cfg: ClusterConfig, opts: RenderOptions) -> list[dict[str, Any]]:
    """One Redis with an append-only file on a volume, so splits and rollouts survive a restart."""
    name = redis_service_name(opts)
    labels = _labels(opts, "redis")
    container: dict[str, Any] = {
        "name": "redis",
        "image": REDIS_IMAGE,
        "args": ["--appendonly", "yes"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    if cfg.redis.password_env:
        password = cfg.redis.password_env
        container["env"] = [{"name": password, "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": password}}}]
        container["args"] += ["--requirepass", f"$({password})"]
        container["readinessProbe"] = {"exec": {"command": ["sh", "-c", f'redis-cli -a "${password}" ping']}, "periodSeconds": 5}
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }],
        },
    }
    service = _service(name, labels, labels, [{"name": "redis", "port": REDIS_PORT, "targetPort": REDIS_PORT}], clusterIP="None")
    return [service, statefulset]


def pod_monitor(opts: RenderOptions) -> dict[str, Any]:
    """Prometheus scrapes Ray's metrics port on every Ray pod (head and workers), where
    Serve's per-deployment request, latency, queue and replica metrics are exported."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{opts.name}-ray", "labels": _labels(opts, "ray")},
        "spec": {
            "selector": {"matchLabels": _labels(opts, "ray")},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def render_objects(cfg: ClusterConfig, plan: Plan, opts: RenderOptions | None = None) -> dict[str, list[dict[str, Any]]]:
    """The objects grouped by the file they go in: ``rayservice``, ``services``, ``redis``
    (empty with an external Redis) and ``monitoring``. Refuses a plan that leaves anything
    unplaced (``DoesNotFitError``)."""
    opts = opts or RenderOptions(name=cfg.name)
    cfg = k8s_config(cfg)
    return {
        "rayservice": [rayservice(cfg, plan, opts)],
        "services": services(cfg, opts),
        "redis": redis_objects(cfg, opts) if in_cluster_redis(cfg) else [],
        "monitoring": [pod_monitor(opts)],
    }
