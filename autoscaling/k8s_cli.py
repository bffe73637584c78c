"""``slmctl k8s render``: write the KubeRay manifests of a cluster config as a kustomize tree.

The tree (``render_tree``, pure; ``write_tree`` writes it):

- ``base/``: the chosen config (``--profile``, default ``gpu``, or ``--config``): the
  RayService with its worker groups sized by the capacity planner for ``--gpu``, the
  gateway and dashboard Services, Redis (unless the config names an external URL), the
  PodMonitor;
- ``overlays/gpu/``: the base with the CUDA image;
- ``overlays/cpu-sim/``: the ``sim`` profile's RayService (fake engines, a CPU worker group
  only) in place of the base's, with the CPU image, for a CPU-only cluster such as kind.

The checked-in ``k8s/`` is ``slmctl k8s render --out k8s``; a unit test keeps them equal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from autoscaling.gpus import DEFAULT_GPU
from autoscaling.manifests import IMAGE, IMAGE_TAG, DoesNotFitError, RenderOptions, k8s_config, redis_objects, render_objects, rayservice_spec
from autoscaling.planner import plan_cluster
from cluster.config import ClusterConfig
from cluster.loader import PROFILES, load_profile, resolve_config

EXIT_BAD_CONFIG, EXIT_DOES_NOT_FIT = 2, 3
MARK = "# Rendered by `slmctl k8s render"
SIM_PROFILE = "sim"


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    k8s = sub.add_parser("k8s", help="Kubernetes: render KubeRay manifests from a cluster config")
    ksub = k8s.add_subparsers(dest="k8s_command", required=True)
    render = ksub.add_parser("render", help="write base/ and overlays/{gpu,cpu-sim}/ as a kustomize tree (docs/kubernetes.md)")
    src = render.add_mutually_exclusive_group()
    src.add_argument("--profile", default="gpu", choices=PROFILES, help="a built-in profile (default: gpu)")
    src.add_argument("--config", help="a cluster config file (YAML or JSON)")
    render.add_argument("--gpu", default=DEFAULT_GPU, help=f"the GPU type the planner sizes the worker groups for (default {DEFAULT_GPU})")
    render.add_argument("--image", default=IMAGE, help=f"the image repository, without tag (default {IMAGE})")
    render.add_argument("--out", required=True, help="the folder to write (e.g. k8s)")
    render.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace) -> int:
    cfg = resolve_config(profile=None if args.config else args.profile, path=args.config)
    source = f"--config {args.config}" if args.config else f"--profile {args.profile}"
    try:
        tree = render_tree(cfg, gpu=args.gpu, image=args.image, source=source)
    except DoesNotFitError as err:
        print(f"error: {err.message}\nLower the replicas or fractions in the config, or pick a larger --gpu (`slmctl plan`).", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except ValueError as err:  # an unknown --gpu
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    out = Path(args.out)
    removed = write_tree(tree, out)
    for path in sorted(tree):
        print(f"wrote {out / path}")
    for path in removed:
        print(f"removed {path} (no longer rendered)")
    print(f"apply with: kubectl apply -k {out / 'overlays' / 'gpu'}   (CPU-only clusters: {out / 'overlays' / 'cpu-sim'})")
    return 0


# --- the tree ----------------------------------------------------------------------------


def render_tree(cfg: ClusterConfig, *, gpu: str = DEFAULT_GPU, image: str = IMAGE, source: str = "--profile gpu",
                sim: ClusterConfig | None = None) -> dict[str, str]:
    """Relative path -> file text for the whole kustomize tree (see the module docstring)."""
    opts = RenderOptions(name=cfg.name, image=f"{image}:{IMAGE_TAG}")
    header = f"{MARK} {source} --gpu {gpu}`; edit the cluster config and render again instead of this file.\n"
    objects = render_objects(cfg, plan_cluster(cfg, gpu, as_configured=True), opts)
    files = {name: objs for name, objs in objects.items() if objs}
    tree = {f"base/{name}.yaml": header + _dump_all(objs) for name, objs in files.items()}
    tree["base/kustomization.yaml"] = header + _dump(_kustomization(resources=[f"{name}.yaml" for name in files]))
    tree["overlays/gpu/kustomization.yaml"] = header + _dump(_kustomization(resources=["../../base"], image=image, tag=f"{IMAGE_TAG}-cuda"))

    sim = k8s_config(sim or load_profile(SIM_PROFILE))
    sim_spec = rayservice_spec(sim, plan_cluster(sim, gpu, as_configured=True), opts)
    patch = [{"op": "replace", "path": "/spec", "value": sim_spec}]
    sim_header = f"{MARK} {source} --gpu {gpu}`: the `sim` profile's RayService spec, in place of the base's.\n"
    tree["overlays/cpu-sim/rayservice-sim.yaml"] = sim_header + _dump(patch)
    resources = ["../../base"]
    if "redis" not in files:  # the base's config names an external Redis; the sim one runs in the cluster
        tree["overlays/cpu-sim/redis.yaml"] = sim_header + _dump_all(redis_objects(sim, opts))
        resources.append("redis.yaml")
    target = {"group": "ray.io", "version": "v1", "kind": "RayService", "name": opts.name}
    kustomization = _kustomization(resources=resources, image=image, tag=f"{IMAGE_TAG}-cpu")
    kustomization["patches"] = [{"path": "rayservice-sim.yaml", "target": target}]
    tree["overlays/cpu-sim/kustomization.yaml"] = sim_header + _dump(kustomization)
    return tree


def _kustomization(*, resources: list[str], image: str | None = None, tag: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}
    if image:
        out["images"] = [{"name": image, "newTag": tag}]
    return out


def write_tree(tree: dict[str, str], out: Path) -> list[Path]:
    """Write every file; remove the files an earlier render wrote (they carry ``MARK``) that
    this one no longer does. Files of your own (no mark) are left alone. Returns the removed."""
    removed = []
    for folder in ("base", "overlays/gpu", "overlays/cpu-sim"):
        for old in sorted((out / folder).glob("*.yaml")):
            rel = old.relative_to(out).as_posix()
            if rel not in tree and old.read_text(encoding="utf-8").startswith(MARK):
                old.unlink()
                removed.append(old)
    for rel, text in tree.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return removed


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so serveConfigV2 reads as YAML inside YAML; no
    anchors and aliases for the label maps that objects share."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def _dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=140)


def _dump_all(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, width=140, explicit_start=True)
