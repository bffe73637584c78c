"""``slmctl plan``: the GPU capacity plan of a config, as a report or as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from autoscaling.gpus import DEFAULT_GPU, GPU_TYPES
from autoscaling.planner import Plan, plan_cluster
from cluster.errors import ConfigError
from cluster.loader import PROFILES, resolve_config

EXIT_OK, EXIT_UNFIT, EXIT_BAD_INPUT = 0, 1, 2


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("plan", help="size each model version's GPU share and pack every replica onto GPUs of one type")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", choices=PROFILES, help="a built-in profile (default: gpu)")
    src.add_argument("--config", help="a cluster config file (YAML or JSON)")
    p.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU type: {', '.join(GPU_TYPES)} (default {DEFAULT_GPU})")
    p.add_argument("--as-configured", action="store_true", help="pack the config's own GPU fractions instead of sizing them")
    p.add_argument("--max-gpus", type=int, help="the GPUs the cluster may have; replicas past them are reported unplaced")
    p.add_argument("--usd-per-gpu-hour", type=float, help="your price per GPU-hour (default: the indicative list price)")
    p.add_argument("--json", action="store_true", help="the plan as one JSON object")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        cfg = resolve_config(profile=None if args.config else (args.profile or "gpu"), path=args.config)
        plan = plan_cluster(
            cfg, args.gpu, as_configured=args.as_configured, usd_per_gpu_hour=args.usd_per_gpu_hour, max_gpus=args.max_gpus
        )
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as err:
        print(f"slmctl plan: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return EXIT_UNFIT if plan.unplaced else EXIT_OK


def _frac(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def format_plan(plan: Plan) -> str:
    lines = [f"Plan on {plan.gpu_type} ({plan.gpu_memory_gib:.1f} GiB each)", ""]
    lines.append(f"{'deployment':<16}{'engine':<14}{'replicas':<10}{'need GiB/GPU':>13}  {'num_gpus':<14}{'engine memory':<14}")
    for s in plan.sizings:
        need = f"{s.need.total_gib:.1f}" if s.need else "-"
        gpus = _frac(s.num_gpus) if s.num_gpus == s.configured_num_gpus else f"{_frac(s.configured_num_gpus)} -> {_frac(s.num_gpus)}"
        mem = _frac(s.engine_memory_fraction)
        if s.engine_memory_fraction != s.configured_engine_memory_fraction:
            mem = f"{_frac(s.configured_engine_memory_fraction)} -> {mem}"
        lines.append(f"{s.deployment:<16}{s.engine:<14}{f'{s.min_replicas}..{s.max_replicas}':<10}{need:>13}  {gpus:<14}{mem:<14}")
        if s.need:
            n = s.need
            lines.append(
                f"{'':<16}weights {n.weights_gib:.1f} + KV {n.kv_cache_gib:.1f} ({n.kv_sequences} x {n.kv_tokens_per_sequence} tokens)"
                f" + overhead {n.overhead_gib:.1f} GiB" + (f", per GPU of {n.gpus}" if n.gpus > 1 else "")
            )
    lines += ["", "Placement (every replica up to max_replicas):"]
    by_gpu: dict[int, list[str]] = {}
    for p in plan.placements:
        by_gpu.setdefault(p.gpu_index, []).append(f"{p.deployment}#{p.replica} {p.num_gpus:g}")
    for index in sorted(by_gpu):
        lines.append(f"  GPU {index}: " + ", ".join(by_gpu[index]))
    lines += ["", "Worker groups:"]
    for g in plan.worker_groups:
        kind = f"{g.gpus_per_pod} x {g.gpu_type}" if g.gpu_type else "no GPU"
        lines.append(f"  {g.name}: {g.min_pods}..{g.max_pods} pods of {kind}, {g.cpus_per_pod} CPUs, {g.memory_gib_per_pod} GiB")
    lines += [
        "",
        f"GPUs needed: {plan.gpus_needed} at max_replicas, {plan.gpus_at_min_replicas} at min_replicas",
        f"Utilisation: {plan.gpu_share_allocated:.0%} of GPU share allocated, {plan.gpu_memory_utilisation:.0%} of GPU memory needed",
        f"Cost: ${plan.usd_per_hour:.2f}/h at max_replicas, ${plan.usd_per_hour_at_min_replicas:.2f}/h at min_replicas"
        f" (${plan.usd_per_gpu_hour:.2f} per GPU-hour)",
    ]
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    for u in plan.unplaced:
        lines.append(f"cannot place {u.deployment}: {u.reason}")
    return "\n".join(lines)
