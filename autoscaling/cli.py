"""``slmctl canary``: start, watch and steer per-model canary rollouts.

The commands speak to the cluster's Redis (found through the running application's config,
or ``--redis-url``): they validate what they can, queue a command for the rollout
controller (the one writer of rollouts) and wait until it has applied it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from autoscaling import rollout as ro
from cluster import traffic
from cluster.cli.ray_cluster import LocalCluster
from cluster.config import ClusterConfig
from cluster.errors import InvalidRequestError
from cluster.serve_config import CONTROLLER_APP, GATEWAY_NAME
from cluster.traffic_store import RedisTrafficStore

WAIT_S = 15.0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    canary = sub.add_parser("canary", help="per-model canary rollouts: start, status, promote, abort, pause, resume, set")
    csub = canary.add_subparsers(dest="canary_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dashboard-port", type=int, default=8265, help="the local cluster's Ray dashboard port (default 8265)")
        p.add_argument("--address", help="another cluster's Ray dashboard, e.g. http://10.0.0.5:8265 (wins over --dashboard-port)")
        p.add_argument("--redis-url", help="talk to this Redis instead of the one the running application names")

    start = csub.add_parser("start", help="roll MODEL out to a new version, step by step, with automatic analysis")
    start.add_argument("model")
    start.add_argument("--to", required=True, dest="version", help="the candidate version (deployed, e.g. v2)")
    start.add_argument("--steps", default="10,25,50,100", help="candidate weights in percent, ending at 100 (default 10,25,50,100)")
    start.add_argument("--interval-s", type=float, default=60.0, help="each step's analysis interval (default 60)")
    start.add_argument("--max-error-rate", type=float, default=0.02, help="the candidate's largest error rate (default 0.02)")
    start.add_argument("--max-latency-ratio", type=float, default=1.5, help="largest p95 latency and TTFT ratio to stable (default 1.5)")
    start.add_argument("--max-escalation-ratio", type=float, default=1.5, help="largest gate escalation-rate ratio to stable (default 1.5)")
    start.add_argument("--min-requests", type=int, default=20, help="candidate requests needed before any judgement (default 20)")
    start.add_argument("--failure-limit", type=int, default=2, help="failed checks in a row that roll back (default 2)")
    start.add_argument("--shadow", action="store_true",
                       help="first mirror --shadow-share of the model's requests to the candidate (answers dropped) for one analysed step")
    start.add_argument("--shadow-share", type=float, default=0.1, help="share of requests mirrored in the shadow phase (default 0.1)")
    common(start)
    start.set_defaults(func=cmd_start)

    status = csub.add_parser("status", help="weights, step, state and the last analysis of each rollout")
    status.add_argument("model", nargs="?")
    status.add_argument("--json", action="store_true")
    common(status)
    status.set_defaults(func=cmd_status)

    for op in ("promote", "abort", "pause", "resume"):
        p = csub.add_parser(op, help=f"{op} MODEL's rollout")
        p.add_argument("model")
        common(p)
        p.set_defaults(func=cmd_op, op=op)

    manual = csub.add_parser("set", help="a manual split: slmctl canary set code v1=90 v2=10")
    manual.add_argument("model")
    manual.add_argument("weights", nargs="+", help="VERSION=PERCENT, summing to 100")
    common(manual)
    manual.set_defaults(func=cmd_set)


# --- finding the cluster ----------------------------------------------------------------


def _cluster(args: argparse.Namespace) -> LocalCluster:
    if not args.address:
        return LocalCluster(dashboard_port=args.dashboard_port)
    parsed = urlsplit(args.address if "://" in args.address else f"http://{args.address}")
    if not parsed.hostname:
        raise InvalidRequestError(f"--address must be a dashboard URL such as http://10.0.0.5:8265, got {args.address!r}")
    return LocalCluster(dashboard_port=parsed.port or 8265, host=parsed.hostname)


def _deployed(args: argparse.Namespace) -> tuple[ClusterConfig, str]:
    cfg, url, _ = _deployed_with_details(args)
    return cfg, url


def _deployed_with_details(args: argparse.Namespace) -> tuple[ClusterConfig, str, dict[str, Any]]:
    """The running application's config, its Redis URL, and Serve's status of every app."""
    cluster = _cluster(args)
    if not cluster.dashboard_up():
        raise InvalidRequestError(f"no Ray cluster answers at {cluster.dashboard_url}; start one with `slmctl up`")
    details = cluster.serve_details()
    for name, app in (details.get("applications") or {}).items():
        config = (app.get("deployed_app_config") or {}).get("args", {}).get("config")
        if name != CONTROLLER_APP and config:
            cfg = ClusterConfig.model_validate(config)
            url = args.redis_url or cfg.redis.resolved_url(os.environ)
            if url is None:
                raise InvalidRequestError("the running application names no Redis; canaries need one (`slmctl up` starts it)")
            return cfg, url, details
    raise InvalidRequestError("no slm-cluster application is deployed; `slmctl up` first")


def _deployment_status(details: dict[str, Any], app: str, deployment: str) -> str:
    found = ((details.get("applications") or {}).get(app) or {}).get("deployments", {}).get(deployment)
    return str(found.get("status", "UNKNOWN")) if found else "NOT DEPLOYED"


def _store(cfg: ClusterConfig, url: str) -> RedisTrafficStore:
    return RedisTrafficStore(url, prefix=cfg.redis.key_prefix, password=cfg.redis.password(os.environ), timeout_s=2.0)


def _model(cfg: ClusterConfig, name: str):  # type: ignore[no-untyped-def]
    model = cfg.model(name)
    if model is None:
        raise InvalidRequestError(f"unknown model {name!r}; models: {', '.join(m.name for m in cfg.models)}")
    return model


async def _wait_for(store: RedisTrafficStore, model: str, done, what: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        record = (await store.read_rollouts()).get(model)
        if record is not None and done(record):
            return record
        await asyncio.sleep(0.2)
    raise InvalidRequestError(f"the rollout controller did not {what} within {WAIT_S:g}s; is the {CONTROLLER_APP} application running?")


# --- commands ---------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    cfg, url, details = _deployed_with_details(args)
    model = _model(cfg, args.model)
    version = model.version(args.version)
    if version is None:
        raise InvalidRequestError(f"{model.name} has no deployed version {args.version!r}; deployed: {', '.join(v.name for v in model.versions)}")
    # A version that runs in the gateway is as healthy as the gateway that holds it.
    where = GATEWAY_NAME if version.runs_in == "gateway" else f"{model.name}-{args.version}"
    health = _deployment_status(details, cfg.name, where)
    if health != "HEALTHY":
        # A candidate that did not start is never given traffic: nothing is left half done.
        raise InvalidRequestError(f"{model.name}@{args.version} is {health}, not HEALTHY; fix or redeploy it first (`slmctl status`)")
    try:
        steps = tuple(int(s) for s in args.steps.split(","))
    except ValueError:
        raise InvalidRequestError(f"--steps must be whole percents separated by commas, got {args.steps!r}") from None

    async def run() -> dict[str, Any]:
        store = _store(cfg, url)
        try:
            snap = await store.snapshot()
            stable = snap.current.get(model.name, model.current.name)
            existing = (await store.read_rollouts()).get(model.name)
            if existing is not None and existing["state"] in ro.RUNNING:
                raise InvalidRequestError(f"{model.name} already has a rollout ({existing['spec']['stable']} -> "
                                          f"{existing['spec']['candidate']}, {existing['state']}); abort or promote it first")
            spec = ro.RolloutSpec(model=model.name, stable=stable, candidate=args.version, steps=steps, interval_s=args.interval_s,
                                  max_error_rate=args.max_error_rate, max_latency_ratio=args.max_latency_ratio,
                                  max_escalation_ratio=args.max_escalation_ratio, min_requests=args.min_requests,
                                  failure_limit=args.failure_limit, shadow=args.shadow, shadow_share=args.shadow_share)
            problems = spec.problems()
            if problems:
                raise InvalidRequestError("; ".join(problems))
            await store.push_command({"op": "start", "model": model.name, "spec": asdict(spec)})
            started_after = time.time() - 1
            return await _wait_for(store, model.name, lambda r: r["spec"]["candidate"] == args.version and r["step_started_at"] >= started_after
                                   and r["state"] in ro.RUNNING, "start it")
        finally:
            await store.close()

    record = asyncio.run(run())
    print(_describe(ro.Rollout.from_dict(record)))
    return 0


def cmd_op(args: argparse.Namespace) -> int:
    cfg, url = _deployed(args)
    model = _model(cfg, args.model)
    target = {"promote": ro.PROMOTED, "abort": ro.ROLLED_BACK, "pause": ro.PAUSED, "resume": ro.PROGRESSING}[args.op]

    async def run() -> dict[str, Any]:
        store = _store(cfg, url)
        try:
            record = (await store.read_rollouts()).get(model.name)
            if record is None:
                raise InvalidRequestError(f"{model.name} has no rollout")
            allowed = {"promote": ro.RUNNING, "abort": ro.RUNNING, "pause": (ro.PROGRESSING,), "resume": (ro.PAUSED,)}[args.op]
            if record["state"] not in allowed:
                raise InvalidRequestError(f"{model.name}'s rollout is {record['state']}; cannot {args.op} it")
            await store.push_command({"op": args.op, "model": model.name})
            return await _wait_for(store, model.name, lambda r: r["state"] == target, args.op)
        finally:
            await store.close()

    print(_describe(ro.Rollout.from_dict(asyncio.run(run()))))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    cfg, url = _deployed(args)
    model = _model(cfg, args.model)
    weights: dict[str, object] = {}
    for item in args.weights:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequestError(f"weights are VERSION=PERCENT, got {item!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise InvalidRequestError(f"the weight of {name} must be a number, got {value!r}") from None
    split = traffic.validate(model, weights)

    async def run() -> None:
        store = _store(cfg, url)
        try:
            record = (await store.read_rollouts()).get(model.name)
            if record is not None and record["state"] in ro.RUNNING:
                raise InvalidRequestError(f"{model.name} has a {record['state']} rollout; abort or promote it before setting weights")
            await store.write_split(model.name, split)
        finally:
            await store.close()

    asyncio.run(run())
    print(f"{model.name}: " + "  ".join(f"{v}={w}" for v, w in split.items()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg, url = _deployed(args)

    async def run() -> tuple[dict[str, Any], Any]:
        store = _store(cfg, url)
        try:
            return await store.read_rollouts(), await store.snapshot()
        finally:
            await store.close()

    rollouts, snap = asyncio.run(run())
    if args.model is not None:
        _model(cfg, args.model)
        rollouts = {k: v for k, v in rollouts.items() if k == args.model}
    if args.json:
        print(json.dumps({"rollouts": rollouts, "splits": snap.splits, "current": snap.current}, indent=2))
        return 0
    if not rollouts:
        print("no rollouts" + (f" for {args.model}" if args.model else ""))
    for record in rollouts.values():
        print(_describe(ro.Rollout.from_dict(record)))
    for model, weights in sorted(snap.splits.items()):
        if args.model in (None, model):
            print(f"split {model}: " + "  ".join(f"{v}={w}" for v, w in weights.items()))
    return 0


def _describe(r: ro.Rollout) -> str:
    s = r.spec
    lines = [f"{s.model}: {s.stable} -> {s.candidate}  {r.state}  step {r.step + 1}/{len(s.all_steps)}  weights "
             + "  ".join(f"{v}={w}" for v, w in r.weights.items())
             + (f"  shadow {s.shadow_share:.0%}" if r.shadowing else "")]
    if r.last is not None:
        checks = ", ".join(f"{c.name} {c.value:.3f} (max {c.limit:g}) {'ok' if c.ok else 'FAIL'}" for c in r.last.checks)
        lines.append(f"  last analysis: {r.last.verdict}" + (f": {checks}" if checks else "") + (f" ({r.last.reason})" if r.last.reason else ""))
    if r.history:
        lines.append(f"  last event: {r.history[-1].split(' ', 1)[1]}")
    return "\n".join(lines)
