"""The front door without Ray: the CPU per request of the gateway's own Python, against the
passthrough's, each app driven in-process.

``benchmarks/front_door.py`` measures both through Serve, where the proxy, Serve's ASGI
plumbing and the replica's threads add several milliseconds to each side. This script runs
the same two FastAPI apps in one process, with no Ray: the passthrough replica class, and
the gateway built from ``front_door.cluster_config(..., "gateway")`` (the remote model in
the gateway, metrics recorded into no-ops). An in-process httpx client (``ASGITransport``)
drives each app, and each app calls the same zero-latency upstream on loopback. It reports
the process CPU time per request of the whole loop: client, app and upstream together, the
same for both sides apart from the app. The difference is what slm-cluster's request
handling costs in Python: parsing and validating the request, the PII screen, routing, the
ensemble's call, building the upstream body, parsing the upstream's answer, the OpenAI
response, headers, audit line and metrics. The passthrough forwards raw bytes.

    .venv/bin/python -m benchmarks.front_door_inprocess --requests 2000 --rounds 3
    .venv/bin/python -m benchmarks.front_door_inprocess --profile 40   # + the gateway's top functions (cProfile)

Figures and reading: docs/benchmarks.md, "Front door".
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from types import SimpleNamespace
from typing import Any

import httpx
from ray import serve

from benchmarks import front_door


class _NoMetric:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _unwrapped(cls: type, member: str) -> type:
    """The class under Serve's ingress wrapper (the one that defines ``member``)."""
    return next(c for c in cls.__mro__ if member in c.__dict__)


async def _cpu_ms_per_request(app: Any, servable: Any, requests: int, model: str, profile: cProfile.Profile | None) -> float:
    serve.get_replica_context = lambda: SimpleNamespace(servable_object=servable, app_name="")  # what Serve's routes read
    body = {"model": model, "messages": [{"role": "user", "content": front_door.PROMPT}], "max_tokens": front_door.ANSWER_TOKENS}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        for _ in range(50):  # warm up: connections, caches
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
        if profile is not None:
            profile.enable()
        start = time.process_time()
        for _ in range(requests):  # a bounded loop, one request at a time
            await client.post("/v1/chat/completions", json=body)
        spent = time.process_time() - start
        if profile is not None:
            profile.disable()
    return spent / requests * 1000


async def run(requests: int, rounds: int, top: int) -> None:
    from deployments.gateway import metrics

    patched = (metrics.make, serve.get_replica_context)
    try:
        await _run(requests, rounds, top)
    finally:  # the stand-ins go, so a test that runs this leaves the modules as it found them
        metrics.make, serve.get_replica_context = patched


async def _run(requests: int, rounds: int, top: int) -> None:
    from deployments.gateway import ingress, metrics

    answers = {False: front_door._completion_bytes("upstream-model"), True: front_door._stream_bytes("upstream-model")}
    upstream = await asyncio.start_server(lambda r, w: front_door._upstream_connection(r, w, answers), "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}/v1"
    from cluster.loader import config_from_dict

    metrics.make = lambda spec: _NoMetric()  # no Ray metrics agent here
    gateway = _unwrapped(ingress.Gateway, "_check_auth")(config_from_dict(front_door.cluster_config(base_url, "gateway")), None, {}, env={})
    passthrough = _unwrapped(front_door.Passthrough, "chat")(base_url)
    cells: dict[str, list[float]] = {"passthrough": [], "slm named, in gateway": []}
    for _ in range(rounds):  # interleaved
        cells["passthrough"].append(await _cpu_ms_per_request(front_door._passthrough_api, passthrough, requests, "upstream-model", None))
        cells["slm named, in gateway"].append(await _cpu_ms_per_request(ingress.api, gateway, requests, front_door.REMOTE, None))
    print(f"in-process, no Ray: {rounds} rounds x {requests} sequential requests; CPU ms per request of client + app + upstream")
    for name, values in cells.items():
        print(f"{name:24s} median {statistics.median(values):.3f}   rounds {', '.join(f'{v:.3f}' for v in values)}")
    gap = statistics.median(cells["slm named, in gateway"]) - statistics.median(cells["passthrough"])
    print(f"slm-cluster's own request handling: {gap:.3f} ms of CPU per request")
    if top:
        profile = cProfile.Profile()
        await _cpu_ms_per_request(ingress.api, gateway, requests, front_door.REMOTE, profile)
        print(f"\ncProfile of the gateway's loop (cumulative, slm-cluster's own functions, top {top}; times are inflated by the profiler):")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(r"(deployments|cluster)/", top)
    await gateway.__del__()  # closes the remote engine's connections ...
    await passthrough.client.aclose()
    await asyncio.sleep(0.1)  # ... so the upstream's connection handlers see EOF and end
    upstream.close()
    await upstream.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the gateway's top N functions (cProfile)")
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.rounds, args.profile))


if __name__ == "__main__":
    main()
