"""Cross-field rules of the cluster config, as one pure function returning every violation."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.config import ClusterConfig


def cross_field_issues(cfg: "ClusterConfig") -> list[tuple[str, str]]:
    """(field path, reason) for each broken rule; empty when the config is coherent."""
    issues: list[tuple[str, str]] = []

    for name, count in Counter(m.name for m in cfg.models).items():
        if count > 1:
            issues.append(("models", f"model name {name!r} is used {count} times; names must be unique"))

    for i, model in enumerate(cfg.models):
        where = f"models[{i}]"
        for vname, count in Counter(v.name for v in model.versions).items():
            if count > 1:
                issues.append((f"{where}.versions", f"version {vname!r} of {model.name!r} appears {count} times"))
        if model.current_version is not None and model.version(model.current_version) is None:
            known = ", ".join(v.name for v in model.versions)
            issues.append((f"{where}.current_version", f"{model.current_version!r} is not one of its versions ({known})"))
        if model.role == "specialist" and not model.domains:
            issues.append((f"{where}.domains", f"specialist {model.name!r} must serve at least one domain"))
        if model.role != "specialist" and model.domains:
            issues.append((f"{where}.domains", f"only specialists serve domains; {model.name!r} is {model.role}"))
        if model.role == "specialist" and "general" in model.domains:
            issues.append((f"{where}.domains", "the general domain belongs to the general model, not a specialist"))

    for i, model in enumerate(cfg.models):
        for j, version in enumerate(model.versions):
            issues.extend(_gpu_issues(f"models[{i}].versions[{j}]", version))

    generals = [m.name for m in cfg.models if m.role == "general"]
    if len(generals) != 1:
        issues.append(("models", f"exactly one model must have role general, found {len(generals)}: {generals}"))
    frontiers = [m.name for m in cfg.models if m.role == "frontier"]
    if len(frontiers) > 1:
        issues.append(("models", f"at most one model may have role frontier, found {len(frontiers)}: {frontiers}"))

    served: dict[str, str] = {}
    for i, model in enumerate(cfg.models):
        for domain in model.domains:
            if domain in served and served[domain] != model.name:
                issues.append(
                    (f"models[{i}].domains", f"domain {domain!r} is served by both {served[domain]!r} and {model.name!r}")
                )
            served.setdefault(domain, model.name)

    tiers = cfg.strategy.cascade_tiers
    if len(set(tiers)) != len(tiers):
        issues.append(("strategy.cascade_tiers", f"each tier may appear once, got {list(tiers)}"))
    if "frontier" in tiers and tiers[-1] != "frontier":
        issues.append(("strategy.cascade_tiers", "frontier, when listed, must be the last tier"))
    if not frontiers and "frontier" in tiers and cfg.strategy.default != "route":
        issues.append(("strategy.default", f"{cfg.strategy.default} needs a model with role frontier"))

    return issues


def _gpu_issues(where: str, version) -> list[tuple[str, str]]:
    """An engine may not claim more GPU memory, or shard over more GPUs, than Ray gives its
    replica: several replicas share one GPU only while their memory shares fit in it."""
    engine, gpus = version.engine, version.resources.num_gpus
    if engine.kind == "vllm":
        fraction, tp, fraction_field, tp_field = engine.gpu_memory_utilization, engine.tensor_parallel_size, "gpu_memory_utilization", "tensor_parallel_size"
    elif engine.kind == "sglang":
        fraction, tp, fraction_field, tp_field = engine.mem_fraction_static, engine.tp_size, "mem_fraction_static", "tp_size"
    else:
        return []
    out = []
    if tp > 1 and gpus < tp:
        out.append((f"{where}.engine.{tp_field}", f"{tp_field} {tp} shards the model over {tp} GPUs, but resources.num_gpus is {gpus:g}"))
    if gpus < 1 and fraction > gpus + 1e-9:
        out.append(
            (
                f"{where}.engine.{fraction_field}",
                f"{fraction_field} {fraction:g} claims more of the GPU than the replica's resources.num_gpus {gpus:g}; "
                "replicas sharing the GPU would run out of memory (`slmctl plan` sizes both)",
            )
        )
    return out
