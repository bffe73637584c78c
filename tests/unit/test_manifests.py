"""KubeRay manifests rendered from the cluster config (``slmctl k8s render``): the checked-in
``k8s/`` is a fresh render, both overlays build with kustomize, the RayService validates
against KubeRay's CRD and everything else against the Kubernetes schemas, and the
serveConfigV2 inside says what the config says, deployment by deployment."""

from __future__ import annotations

import copy
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from autoscaling import manifests as mf
from autoscaling.k8s_cli import MARK, render_tree, write_tree
from autoscaling.planner import plan_cluster
from cluster.config import ClusterConfig
from cluster.loader import config_from_dict, load_profile, profile_text
from cluster.serve_config import CONTROLLER_APP, GATEWAY_NAME, IMPORT_PATH, ROUTER_NAME, data_plane_deployments

REPO = Path(__file__).parents[2]
CHECKED_IN = REPO / "k8s"
CRD = REPO.parent / "shared/schemas/ray.io_rayservices.yaml"
K8S_VERSIONS = ("1.28.0", "1.32.0")  # the oldest we claim, and the kubectl on these machines


@lru_cache(maxsize=None)
def gpu_tree() -> dict[str, str]:
    return render_tree(load_profile("gpu"))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s")
    write_tree(gpu_tree(), out)
    return out


def objects_in(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def base_objects() -> list[dict[str, Any]]:
    tree = gpu_tree()
    return [o for path, text in sorted(tree.items()) if path.startswith("base/") and not path.endswith("kustomization.yaml")
            for o in objects_in(text)]


def the(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"want one {kind} {name or ''}, got {len(found)}"
    return found[0]


def sim_rayservice() -> dict[str, Any]:
    (patch,) = yaml.safe_load(gpu_tree()["overlays/cpu-sim/rayservice-sim.yaml"])
    assert patch["op"] == "replace" and patch["path"] == "/spec"
    return {**the(base_objects(), "RayService"), "spec": patch["value"]}


def ray_pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    rc = rayservice["spec"]["rayClusterConfig"]
    return [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]


def with_redis_url(url: str) -> ClusterConfig:
    data = yaml.safe_load(profile_text("gpu"))
    data["redis"] = {"url": url}
    return config_from_dict(data)


# --- the checked-in tree ------------------------------------------------------------------


def test_checked_in_k8s_is_a_fresh_render() -> None:
    """Edit the config, then `slmctl k8s render --out k8s`: never the YAML by hand."""
    tree = gpu_tree()
    # k8s/monitoring/ (the Prometheus scrape config and Grafana dashboard) is hand-kept, not rendered.
    on_disk = {
        p.relative_to(CHECKED_IN).as_posix(): p.read_text(encoding="utf-8")
        for p in CHECKED_IN.rglob("*")
        if p.is_file() and p.relative_to(CHECKED_IN).parts[0] != "monitoring"
    }
    assert sorted(on_disk) == sorted(tree), "k8s/ holds other files than a render; run `slmctl k8s render --out k8s`"
    stale = [path for path in tree if on_disk[path] != tree[path]]
    assert not stale, f"k8s/ differs from a fresh render in {stale}; run `slmctl k8s render --out k8s`"


def test_the_tree_has_a_base_and_two_overlays() -> None:
    assert sorted(gpu_tree()) == [
        "base/kustomization.yaml", "base/monitoring.yaml", "base/rayservice.yaml", "base/redis.yaml", "base/services.yaml",
        "overlays/cpu-sim/kustomization.yaml", "overlays/cpu-sim/rayservice-sim.yaml", "overlays/gpu/kustomization.yaml",
    ]
    assert all(text.startswith(MARK) for text in gpu_tree().values())


# --- kustomize ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["gpu", "cpu-sim"])
def test_kustomize_builds_each_overlay(rendered: Path, overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run([kubectl, "kustomize", str(rendered / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    objs = objects_in(done.stdout)
    assert sorted(o["kind"] for o in objs) == ["PodMonitor", "RayService", "Service", "Service", "Service", "StatefulSet"]
    rayservice = the(objs, "RayService")
    images = {c["image"] for t in ray_pod_templates(rayservice) for c in t["spec"]["containers"]}
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu_limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups]
    apps = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    engines = {v["engine"]["kind"] for m in apps[0]["args"]["config"]["models"] for v in m["versions"]}
    if overlay == "gpu":
        assert images == {f"{mf.IMAGE}:{mf.IMAGE_TAG}-cuda"}
        assert any(gpu_limits) and "vllm" in engines
    else:
        assert images == {f"{mf.IMAGE}:{mf.IMAGE_TAG}-cpu"}
        assert not any(gpu_limits) and engines == {"fake"}
        assert [g["groupName"] for g in groups] == ["cpu"]


# --- schemas ------------------------------------------------------------------------------


def strict_crd_schema(node: Any) -> Any:
    """A CRD's structural schema made strict for jsonschema: unknown fields are errors (the
    API server prunes or, with kubectl's strict field validation, rejects them) and
    ``x-kubernetes-int-or-string`` takes an integer or a string. Other ``x-kubernetes-*``
    keys (list types, CEL rules) are not checked here."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {k: strict_crd_schema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_crd_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_crd_schema(s) for s in out[key]]
    return out


@lru_cache(maxsize=1)
def rayservice_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(CRD.read_text(encoding="utf-8"))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_crd_schema(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayservice_validator().iter_errors(obj)]


@pytest.mark.skipif(not CRD.is_file(), reason=f"no KubeRay CRD at {CRD}")
@pytest.mark.parametrize("which", ["gpu", "cpu-sim"])
def test_rayservice_validates_against_the_kuberay_crd(which: str) -> None:
    rayservice = the(base_objects(), "RayService") if which == "gpu" else sim_rayservice()
    assert crd_errors(rayservice) == []


@pytest.mark.skipif(not CRD.is_file(), reason=f"no KubeRay CRD at {CRD}")
def test_the_strict_crd_check_catches_a_misspelt_field() -> None:
    bad = copy.deepcopy(the(base_objects(), "RayService"))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    errors = crd_errors(bad)
    assert any("rayStartParam" in e for e in errors) and any("minReplicas" in e for e in errors), errors


def k8s_validate(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:  # its str() prints the whole schema
        caught = err.caught
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {'.'.join(map(str, caught.absolute_path))}: {caught.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_other_object_validates_against_the_kubernetes_schemas(version: str) -> None:
    objs = base_objects()
    core = [o for o in objs if o["apiVersion"] in ("v1", "apps/v1")]
    assert sorted(o["kind"] for o in core) == ["Service", "Service", "Service", "StatefulSet"]
    for obj in core:
        k8s_validate(obj, version)
    # The Ray pods are plain pod templates inside the CRD: hold them to the core schema too.
    for rayservice in (the(objs, "RayService"), sim_rayservice()):
        for i, template in enumerate(ray_pod_templates(rayservice)):
            k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}"}, "template": template}, version)


def test_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod() -> None:
    """kubernetes-validate does not know the Prometheus operator's CRDs: checked by shape."""
    objs = base_objects()
    monitor = the(objs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    for rayservice in (the(objs, "RayService"), sim_rayservice()):
        for template in ray_pod_templates(rayservice):
            labels = template["metadata"]["labels"]
            assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
            ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert ports["metrics"] == mf.METRICS_PORT


def test_services_select_the_pods_they_name() -> None:
    objs = base_objects()
    rayservice = the(objs, "RayService")
    head, *workers = ray_pod_templates(rayservice)
    gateway = the(objs, "Service", "slm-gateway")["spec"]
    # KubeRay adds ray.io/serve (a ready proxy) and ray.io/node-type itself; the rest is ours.
    assert {k: v for k, v in gateway["selector"].items() if k != "ray.io/serve"}.items() <= head["metadata"]["labels"].items()
    assert gateway["selector"]["ray.io/serve"] == "true" and gateway["ports"][0]["port"] == 8000
    dashboard = the(objs, "Service", "slm-dashboard")["spec"]
    assert dashboard["selector"]["ray.io/node-type"] == "head" and dashboard["ports"][0]["port"] == mf.DASHBOARD_PORT
    redis_svc, redis_sts = the(objs, "Service", "slm-redis"), the(objs, "StatefulSet")
    assert redis_svc["spec"]["selector"] == redis_sts["spec"]["selector"]["matchLabels"] == redis_sts["spec"]["template"]["metadata"]["labels"]
    assert redis_sts["spec"]["serviceName"] == "slm-redis" and redis_sts["spec"]["volumeClaimTemplates"]


# --- what the manifests say -----------------------------------------------------------------


def test_serve_config_matches_the_config_deployment_by_deployment() -> None:
    cfg = load_profile("gpu")
    rayservice = the(base_objects(), "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    data, control = serve["applications"]
    assert (data["import_path"], data["route_prefix"]) == (IMPORT_PATH, "/")
    assert control["name"] == CONTROLLER_APP  # the gpu profile names a Redis
    inline = ClusterConfig.model_validate(data["args"]["config"])
    assert inline == cfg == ClusterConfig.model_validate(control["args"]["config"])
    listed = {d["name"]: d for d in data["deployments"]}
    assert list(listed) == cfg.deployment_names() + [ROUTER_NAME, GATEWAY_NAME]
    for model, version in cfg.deployments():
        got = listed[f"{model.name}-{version.name}"]
        assert got["ray_actor_options"] == version.resources.ray_actor_options()
        assert got["ray_actor_options"]["num_gpus"] == version.resources.num_gpus
        assert got["autoscaling_config"] == version.autoscaling.serve_options()
        assert got["max_ongoing_requests"] == version.max_ongoing_requests
    for name, block in ((ROUTER_NAME, cfg.router), (GATEWAY_NAME, cfg.gateway)):
        assert listed[name]["ray_actor_options"] == block.resources.ray_actor_options()
        assert listed[name]["autoscaling_config"] == block.autoscaling.serve_options()
        assert listed[name]["max_ongoing_requests"] == block.max_ongoing_requests


def test_the_deployments_section_agrees_with_what_build_app_sets() -> None:
    """A serve config's ``deployments:`` overrides the options set in code; both come from
    ``cluster.serve_config.deployment_options``, and Serve's own schema accepts them."""
    pytest.importorskip("ray")
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from deployments import app  # imports Ray Serve, starts nothing

    cfg = load_profile("gpu")
    assert app.deployment_options is mf.data_plane_deployments.__globals__["deployment_options"]
    want = data_plane_deployments(cfg)
    for rayservice in (the(base_objects(), "RayService"), sim_rayservice()):
        serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        ServeDeploySchema.parse_obj(serve)  # what Serve's REST API, and so KubeRay, accepts
        for deployment in serve["applications"][0]["deployments"]:
            AutoscalingConfig(**deployment["autoscaling_config"])
    serve = yaml.safe_load(the(base_objects(), "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"] == want


def test_head_runs_no_replica_and_the_worker_groups_are_the_plan() -> None:
    cfg = load_profile("gpu")
    plan = plan_cluster(cfg, "H100-80GB", as_configured=True)
    rc = the(base_objects(), "RayService")["spec"]["rayClusterConfig"]
    assert rc["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0", "object-store-memory": mf.OBJECT_STORE_BYTES}
    assert rc["enableInTreeAutoscaling"] is True
    groups = rc["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [g.name for g in plan.worker_groups]
    assert any(g.gpu_type is None for g in plan.worker_groups) and any(g.gpu_type for g in plan.worker_groups)
    for spec, group in zip(groups, plan.worker_groups):
        spare = mf.SPARE_GPU_PODS if group.gpu_type else 0  # Ray's scheduler may fragment GPUs more than the plan
        assert (spec["replicas"], spec["minReplicas"], spec["maxReplicas"]) == (group.min_pods, group.min_pods, group.max_pods + spare)
        assert int(spec["rayStartParams"]["object-store-memory"]) < mf.SHM_GIB * 1024**3
        pod = spec["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["cpu"] == str(group.cpus_per_pod) and limits["memory"] == f"{group.memory_gib_per_pod}Gi"
        if group.gpu_type:
            assert limits["nvidia.com/gpu"] == str(group.gpus_per_pod) == spec["rayStartParams"]["num-gpus"]
            assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert "nvidia.com/gpu" not in limits and "num-gpus" not in spec["rayStartParams"] and "nodeSelector" not in pod


def test_secrets_come_from_a_secret_and_redis_from_the_cluster() -> None:
    for template in ray_pod_templates(the(base_objects(), "RayService")):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["SLM_REDIS_URL"]["value"] == "redis://slm-redis:6379/0"
        for name in ("SLM_API_KEYS", "OPENAI_API_KEY"):
            assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": "slm-secrets", "key": name, "optional": True}}}
    assert not [o for o in base_objects() if o["kind"] == "Secret"]


def test_an_external_redis_renders_no_redis_and_the_sim_overlay_brings_its_own() -> None:
    tree = render_tree(with_redis_url("redis://redis.example:6379/0"))
    assert "base/redis.yaml" not in tree
    base = objects_in(tree["base/rayservice.yaml"])[0]
    env = {e["name"] for t in ray_pod_templates(base) for e in t["spec"]["containers"][0]["env"]}
    assert "SLM_REDIS_URL" not in env
    assert [o["kind"] for o in objects_in(tree["overlays/cpu-sim/redis.yaml"])] == ["Service", "StatefulSet"]
    assert "redis.yaml" in yaml.safe_load(tree["overlays/cpu-sim/kustomization.yaml"])["resources"]


def test_a_config_without_redis_gets_the_in_cluster_one() -> None:
    """The sim profile names no Redis (``slmctl up`` embeds one); on Kubernetes it gets ours."""
    serve = yaml.safe_load(sim_rayservice()["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["config"]["redis"]["url_env"] == mf.REDIS_URL_ENV
    assert [a["name"] for a in serve["applications"]][1] == CONTROLLER_APP


@dataclass(frozen=True)
class _Unplaced:
    deployment: str
    reason: str


@dataclass(frozen=True)
class _Plan:
    worker_groups: tuple[Any, ...]
    unplaced: tuple[_Unplaced, ...]


def test_a_plan_that_does_not_fit_is_refused_with_the_reason() -> None:
    plan = _Plan((), (_Unplaced("general-v1", "needs 90 GiB on one GPU; a T4-16GB has 15 GiB"),))
    with pytest.raises(mf.DoesNotFitError, match="general-v1: needs 90 GiB"):
        mf.render_objects(load_profile("gpu"), plan)


def test_slmctl_k8s_render_writes_the_tree_and_refuses_an_unknown_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli.main import main

    assert main(["k8s", "render", "--profile", "gpu", "--out", str(tmp_path)]) == 0
    assert {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*.yaml")} == gpu_tree()
    assert main(["k8s", "render", "--gpu", "B9000", "--out", str(tmp_path / "x")]) == 2
    assert "unknown GPU type" in capsys.readouterr().err


def test_write_tree_removes_only_files_it_rendered_before(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "old.yaml").write_text(f"{MARK} --profile gpu\n")
    (tmp_path / "base" / "mine.yaml").write_text("# my own patch\n")
    removed = write_tree({"base/kustomization.yaml": "x\n"}, tmp_path)
    assert removed == [tmp_path / "base" / "old.yaml"]
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["kustomization.yaml", "mine.yaml"]


def test_slmctl_k8s_render_exits_3_and_writes_nothing_when_the_plan_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoscaling import k8s_cli
    from cluster.cli.main import main

    unfit = _Plan((), (_Unplaced("general-v1", "needs 90 GiB on one GPU"),))
    monkeypatch.setattr(k8s_cli, "plan_cluster", lambda cfg, gpu, as_configured: unfit)
    assert main(["k8s", "render", "--out", str(tmp_path / "out")]) == 3
    assert "general-v1: needs 90 GiB on one GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
