"""SLO attainment and replica-seconds for a burst of traffic, under the LLM-aware policy
and under Serve's default policy.

One model-server deployment of a fake engine (40 ms to the first token, 20 tokens a
second, 32-token answers: about 1.6 s an answer) with ``--slots`` (4) slots per replica
(``max_ongoing_requests``, like an engine's batch), from one replica up to
``--max-replicas``. An open-loop load (arrivals at a fixed rate, whether or not earlier
answers came back: users do not wait for each other) goes through a handle from this
process: ``--base-rps`` for ``--lead-s``, ``--burst-rps`` for ``--burst-s``, the base
rate again for ``--tail-s``, then nothing until ``--window-s``. Each request's time to
first token is measured here, so it includes the time it queued for a slot; it meets the
SLO when it is at most ``--slo-ms``. Replica-seconds integrate Serve's replica count
(every state but STOPPING: a starting replica holds its resources too) over the window.

Policies compared (same deployment, same load):

- ``llm``: ``autoscaling.serve_policy`` with ``target_ongoing_requests: 3`` (of 4 slots),
  the TTFT SLO, ``--upscale-delay-s`` / ``--downscale-delay-s``;
- ``serve-default``: Serve's own policy at its default target (2 ongoing requests per
  replica), with the same delays and metric windows as ``llm``;
- ``serve-defaults-all``: Serve's policy with every Serve default (target 2, 30 s up
  delay, 600 s down delay, 30 s look-back, 10 s metric pushes).

    python -m benchmarks.autoscaling [--policies llm,serve-default,serve-defaults-all]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time
from typing import Any

from benchmarks.stats import percentile, table

APP = "bench-autoscale"
DEPLOYMENT = "code-v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version_config(autoscaling: dict[str, Any], *, engine: dict[str, Any] | None = None, max_ongoing: int = 4,
                   resources: dict[str, Any] | None = None) -> Any:
    from cluster.config import ModelVersionConfig

    return ModelVersionConfig.model_validate({
        "name": "v1",
        "engine": engine or {"kind": "fake", "ttft_ms": 40, "tokens_per_s": 20, "default_completion_tokens": 32},
        "resources": resources or {"num_cpus": 0.05},
        "autoscaling": autoscaling,
        "max_ongoing_requests": max_ongoing,
        # The first chunk goes at once; the rest in few messages, so that the load
        # generator and Ray's messaging do not crowd a small machine.
        "stream_batch_interval_ms": 500,
    })


def deploy_one(version: Any, *, model: str = "code", app: str = APP) -> Any:
    """One ModelServer deployment, with the options ``deployments.app`` would give it."""
    from ray import serve

    from deployments.model_server import ModelServer

    dep = serve.deployment(ModelServer).options(
        name=f"{model}-{version.name}",
        ray_actor_options=version.resources.ray_actor_options(),
        autoscaling_config=version.autoscaling.serve_options(),
        max_ongoing_requests=version.max_ongoing_requests,
        health_check_period_s=10,
        health_check_timeout_s=30,
    )
    return serve.run(dep.bind(model, version), name=app, route_prefix=None)


def replicas_held(app: str = APP, deployment: str = DEPLOYMENT) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    states = status.deployments[deployment].replica_states
    return int(sum(n for state, n in states.items() if state != "STOPPING"))


def running_replicas(app: str = APP, deployment: str = DEPLOYMENT) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


def request(i: int, max_tokens: int = 32) -> Any:
    from cluster.types import ChatMessage, GenerationRequest, SamplingParams

    return GenerationRequest(request_id=f"bench-{i}", messages=(ChatMessage("user", f"question {i}"),),
                             sampling=SamplingParams(max_tokens=max_tokens))


async def one_call(handle: Any, i: int) -> tuple[float, bool]:
    """(seconds to the first chunk, whether it finished)."""
    started = time.monotonic()
    first = None
    stream = handle.options(stream=True).generate.remote(request(i))
    try:
        async for _ in stream:
            if first is None:
                first = time.monotonic() - started
        return (first if first is not None else float("inf")), True
    except Exception:  # noqa: BLE001 - counted as a miss
        return float("inf"), False


class ReplicaMeter:
    """Integrates the replica count over time from a background thread (Serve's status is
    a blocking call)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), replicas_held()))
            self._stop.wait(self.period_s)

    def __enter__(self) -> "ReplicaMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def replica_seconds(self, start: float, end: float) -> float:
        total, points = 0.0, [(t, n) for t, n in self.samples if start <= t <= end]
        for (t0, n0), (t1, _) in zip(points, points[1:]):
            total += n0 * (t1 - t0)
        return total

    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)


async def load(handle: Any, phases: list[tuple[float, float]]) -> list[tuple[float, bool]]:
    """Open-loop arrivals: ``(rate, seconds)`` phases; every call is awaited at the end."""
    tasks: list[asyncio.Task] = []
    i = 0
    start = time.monotonic()
    at = 0.0
    for rps, seconds in phases:
        end = at + seconds
        while at < end:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_call(handle, i)))
            i += 1
            at += 1 / rps
        at = end
    return list(await asyncio.gather(*tasks))


def autoscaling_for(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    bounds = {"min_replicas": 1, "max_replicas": args.max_replicas}
    fast = {"upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
            "look_back_period_s": args.look_back_s, "metrics_interval_s": args.metrics_interval_s}
    if policy == "llm":
        return {**bounds, **fast, "policy": "llm", "target_ongoing_requests": 3, "ttft_slo_ms": args.slo_ms}
    if policy == "serve-default":
        return {**bounds, **fast, "target_ongoing_requests": 2}
    if policy == "serve-defaults-all":
        return {**bounds, "target_ongoing_requests": 2, "upscale_delay_s": 30, "downscale_delay_s": 600}
    raise SystemExit(f"unknown policy {policy!r}")


def run_policy(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    handle = deploy_one(version_config(autoscaling_for(policy, args), max_ongoing=args.slots))
    phases = [(args.base_rps, args.lead_s), (args.burst_rps, args.burst_s), (args.base_rps, args.tail_s)]
    with ReplicaMeter() as meter:
        t0 = time.monotonic()
        results = asyncio.run(load(handle, phases))
        rest = t0 + args.window_s - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        t_end = t0 + args.window_s
    serve.delete(APP)
    ttfts = [t for t, _ in results]
    met = sum(1 for t, ok in results if ok and t * 1000 <= args.slo_ms)
    finite = [t * 1000 for t in ttfts if t != float("inf")]
    return {
        "policy": policy,
        "requests": len(results),
        "failed": sum(1 for _, ok in results if not ok),
        "slo_attainment": f"{met / len(results):.1%}",
        "ttft_p50_ms": round(percentile(finite, 50)),
        "ttft_p95_ms": round(percentile(finite, 95)),
        "ttft_p99_ms": round(percentile(finite, 99)),
        "replica_s": round(meter.replica_seconds(t0, t_end), 1),
        "peak_replicas": meter.peak(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="llm,serve-default,serve-defaults-all")
    parser.add_argument("--slo-ms", type=float, default=250)
    parser.add_argument("--base-rps", type=float, default=1)
    parser.add_argument("--burst-rps", type=float, default=8)
    parser.add_argument("--lead-s", type=float, default=10)
    parser.add_argument("--burst-s", type=float, default=30)
    parser.add_argument("--tail-s", type=float, default=20)
    parser.add_argument("--window-s", type=float, default=90)
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4, help="max_ongoing_requests per replica")
    parser.add_argument("--upscale-delay-s", type=float, default=1)
    parser.add_argument("--downscale-delay-s", type=float, default=10)
    parser.add_argument("--look-back-s", type=float, default=3)
    parser.add_argument("--metrics-interval-s", type=float, default=0.25)
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import warnings

    import ray
    from ray import serve

    warnings.filterwarnings("ignore", message="The `metrics_interval_s` field")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        rows = [run_policy(p, args) for p in args.policies.split(",")]
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"burst: {args.base_rps:g} rps for {args.lead_s:g} s, {args.burst_rps:g} rps for {args.burst_s:g} s, {args.base_rps:g} rps "
          f"for {args.tail_s:g} s; replica-seconds over {args.window_s:g} s; SLO: TTFT <= {args.slo_ms:g} ms")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
