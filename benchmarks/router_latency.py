"""Latency and batching gain of the Router deployment with the trained micro-model.

Starts a local Ray + Serve with only the Router deployment (the shipped artifact unless
``--artifact``), then calls ``route`` through its DeploymentHandle with real prompts
(MMLU-style, truncated by the embedder at 256 tokens): p50/p99 at concurrency 1, and
requests/s at concurrency 1 and 32 (``@serve.batch`` groups concurrent requests into one
embedder forward pass).

    python -m benchmarks.router_latency --data ../shared/data/router/mmlu_train.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
from pathlib import Path

from benchmarks.gateway_overhead import _drive
from benchmarks.stats import percentile, table


def _prompts(path: Path, n: int, seed: int) -> list[str]:
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
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
                     "mean_batch": round((after["items"] - before["items"]) / max(calls, 1), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/router/mmlu_train.jsonl"))
    parser.add_argument("--artifact", help="router artifact folder (default: the shipped one)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the router replica (router.torch_threads)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.config import RouterConfig
    from deployments.router import Router

    prompts = _prompts(args.data, 500, 0)
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

    print(f"Router deployment, trained artifact, {len(prompts)} MMLU prompts (<=256 tokens), "
          f"batch wait {cfg.batch_wait_timeout_s * 1000:g} ms, torch threads {args.threads}")
    print(table(rows, ["concurrency", "requests", "p50_ms", "p99_ms", "rps", "mean_batch"]))
    base = rows[0]["rps"]
    for r in rows[1:]:
        print(f"throughput at concurrency {r['concurrency']}: {r['rps'] / base:.2f}x concurrency {rows[0]['concurrency']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
