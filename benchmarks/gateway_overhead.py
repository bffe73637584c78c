"""What the gateway + router path adds over calling a ModelServer handle directly.

Runs a real local Ray + Serve with zero-latency ``fake`` engines, then measures:
- direct: ``DeploymentHandle`` streaming call to the ``code-v1`` ModelServer from the driver;
- gateway: HTTP ``POST /v1/chat/completions`` with ``model: auto`` (router decision, then the
  same ModelServer) through Serve's proxy, non-streamed;
at concurrency 1 and 16: p50 / p99 latency and requests per second.

    python -m benchmarks.gateway_overhead --requests 400 --json-out bench_out/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path

import httpx

from benchmarks.stats import percentile, table

CONFIG = {
    "name": "bench",
    "models": [
        {"name": "code", "role": "specialist", "domains": ["code"],
         "versions": [{"name": "v1", "engine": {"kind": "fake", "default_completion_tokens": 16}, "resources": {"num_cpus": 0.1}, "max_ongoing_requests": 64}]},
        {"name": "general", "role": "general",
         "versions": [{"name": "v1", "engine": {"kind": "fake", "default_completion_tokens": 16}, "resources": {"num_cpus": 0.1}, "max_ongoing_requests": 64}]},
    ],
    # The keyword router: this measures the plumbing; benchmarks/router_latency.py measures
    # the trained router's own cost.
    "router": {"kind": "heuristic", "resources": {"num_cpus": 0.1}},
    "gateway": {"resources": {"num_cpus": 0.1}},
}
PROMPT = "Write a Python function that reverses a list."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(call, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def _row(path: str, concurrency: int, latencies: list[float], wall: float) -> dict:
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "rps": round(len(latencies) / wall, 1),
    }


async def _measure(base_url: str, handle, requests: int, concurrencies: list[int]) -> list[dict]:
    from cluster.types import ChatMessage, GenerationRequest, SamplingParams

    gen = GenerationRequest("bench", (ChatMessage("user", PROMPT),), SamplingParams(max_tokens=16))
    stream_handle = handle.options(stream=True)

    async def direct() -> None:
        async for _ in stream_handle.generate.remote(gen):
            pass

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}

        async def gateway() -> None:
            resp = await client.post("/v1/chat/completions", json=body)
            resp.raise_for_status()
            assert resp.headers["x-slm-model"] == "code"

        rows = []
        for fn, name in ((direct, "direct handle"), (gateway, "gateway+router (HTTP)")):
            await _drive(fn, 4, 40)  # warm up connections, handles and replicas
            for c in concurrencies:
                lat, wall = await _drive(fn, c, requests)
                rows.append(_row(name, c, lat, wall))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per (path, concurrency) cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.loader import config_from_dict
    from deployments.app import build_from_config

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_from_config(config_from_dict(CONFIG)), name="bench", route_prefix="/")
        handle = serve.get_deployment_handle("code-v1", app_name="bench")
        rows = asyncio.run(_measure(f"http://127.0.0.1:{port}", handle, args.requests, args.concurrency))
    finally:
        # With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 the handle's router lives on the loop that
        # asyncio.run already closed, and shutting its cached handle down raises; the
        # measurement is complete by then.
        with contextlib.suppress(RuntimeError):
            serve.shutdown()
        ray.shutdown()

    mode = "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" else "default Serve settings"
    print(f"fake engines at zero latency, 16 tokens per answer, {mode}")
    print(table(rows, ["path", "concurrency", "requests", "p50_ms", "p99_ms", "rps"]))
    by = {(r["path"], r["concurrency"]): r for r in rows}
    print()
    for c in args.concurrency:
        d, g = by[("direct handle", c)], by[("gateway+router (HTTP)", c)]
        print(f"added by gateway+router at concurrency {c}: p50 +{g['p50_ms'] - d['p50_ms']:.2f} ms, p99 +{g['p99_ms'] - d['p99_ms']:.2f} ms")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
