"""Latency and batching gain of the Router deployment with the trained micro-model.

Starts a local Ray + Serve with only the Router deployment (the shipped artifact unless
``--artifact``), then calls ``route`` through its DeploymentHandle with real prompts
(MMLU-style, truncated by the embedder at 256 tokens): p50/p99 at concurrency 1, and
requests/s at concurrency 1 and 32 (``@serve.batch`` groups concurrent requests, and
``BusyMerger`` joins what queues while the model is busy into one embedder pass). It first
times the model alone in this process, one prompt at a time and in batches, since that
ratio bounds the gain batching can give in the deployment.

    python -m benchmarks.router_latency --data ../shared/data/router/mmlu_train.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
from pathlib import Path

from benchmarks.gateway_overhead import _drive
from benchmarks.stats import percentile, table


def _prompts(path: Path, n: int, seed: int) -> list[str]:
    from router_models.data import read_jsonl

    rows = [ex.prompt for ex in read_jsonl(path)]
    return random.Random(seed).sample(rows, min(n, len(rows)))


async def _measure(handle, prompts: list[str], requests: int, concurrencies: list[int]) -> list[dict]:
    it = iter(range(10**9))

    async def call() -> None:
        await handle.route.remote(prompts[next(it) % len(prompts)])

    await _drive(call, 4, 40)  # warm-up
    rows = []
    for c in concurrencies:
        before = await handle.batch_stats.remote()
        lat, wall = await _drive(call, c, requests)
        after = await handle.batch_stats.remote()
        calls = after["calls"] - before["calls"]
        rows.append({"concurrency": c, "requests": len(lat), "p50_ms": round(percentile(lat, 50) * 1000, 2),
                     "p99_ms": round(percentile(lat, 99) * 1000, 2), "rps": round(len(lat) / wall, 1),
                     "mean_batch": round((after["items"] - before["items"]) / max(calls, 1), 1),
                     # time inside the model per request: the rest of p50 is Serve and queueing
                     "model_ms": round((after["busy_s"] - before["busy_s"]) * 1000 / max(len(lat), 1), 2)})
    return rows


def _offline(artifact: str | None, prompts: list[str], threads: int, batch: int) -> dict:
    """The model alone, in this process (no Serve): ms per prompt scored one at a time and
    in batches of ``batch``. Their ratio bounds what batching can gain in the deployment."""
    import time

    from cluster.config import RouterConfig
    from router_models import create_router_model

    model = create_router_model(RouterConfig(kind="trained", artifact_path=artifact, torch_threads=threads))
    model.load()
    for p in prompts[:8]:
        model.score([p])
    n = min(len(prompts), 10 * batch)
    t0 = time.perf_counter()
    for p in prompts[:n]:
        model.score([p])
    single = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        model.score(prompts[i : i + batch])
    batched = (time.perf_counter() - t0) / n
    tokens = [len(ids) for ids in model.embedder.token_ids(prompts)]  # as the router sees them (<= 256)
    return {"single_ms": round(single * 1000, 2), "batched_ms_per_prompt": round(batched * 1000, 2), "batch": batch,
            "tokens_mean": round(sum(tokens) / len(tokens)), "tokens_max": max(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/router/mmlu_train.jsonl"))
    parser.add_argument("--artifact", help="router artifact folder (default: the shipped one)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the router replica (router.torch_threads; 1 in the local profile)")
    parser.add_argument("--no-throughput-optimized", dest="throughput_optimized", action="store_false",
                        help="leave Serve's default settings (slmctl up sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1 by default)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.throughput_optimized:
        # as `slmctl up` runs it; read by Serve at import, and inherited by the replicas
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"

    import ray
    from ray import serve

    from cluster.config import RouterConfig
    from deployments.router import Router

    prompts = _prompts(args.data, 500, 0)
    offline = _offline(args.artifact, prompts, args.threads, max(args.concurrency))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Ray sets OMP_NUM_THREADS=num_cpus in actors; the embedder asks for both cores itself.
        cfg = RouterConfig(kind="trained", artifact_path=args.artifact, resources={"num_cpus": 1}, torch_threads=args.threads)
        app = serve.deployment(Router).options(name="router", max_ongoing_requests=256).bind(cfg)
        handle = serve.run(app, name="router_bench", route_prefix=None)
        rows = asyncio.run(_measure(handle, prompts, args.requests, args.concurrency))
    finally:
        with contextlib.suppress(RuntimeError):
            serve.shutdown()
        ray.shutdown()

    print(f"Router deployment, trained artifact, {len(prompts)} prompts from {args.data.name} "
          f"({offline['tokens_mean']} tokens mean, {offline['tokens_max']} max after truncation), "
          f"batch wait {cfg.batch_wait_timeout_s * 1000:g} ms, torch threads {args.threads}, "
          + ("RAY_SERVE_THROUGHPUT_OPTIMIZED=1" if args.throughput_optimized else "default Serve settings"))
    print(table(rows, ["concurrency", "requests", "p50_ms", "p99_ms", "rps", "mean_batch", "model_ms"]))
    print(f"model alone (no Serve): {offline['single_ms']} ms a prompt one at a time, "
          f"{offline['batched_ms_per_prompt']} ms a prompt in batches of {offline['batch']} "
          f"({offline['single_ms'] / offline['batched_ms_per_prompt']:.2f}x)")
    base = rows[0]["rps"]
    for r in rows[1:]:
        print(f"throughput at concurrency {r['concurrency']}: {r['rps'] / base:.2f}x concurrency {rows[0]['concurrency']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows, "offline": offline}, indent=2))


if __name__ == "__main__":
    main()
