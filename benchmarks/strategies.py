"""The strategies on the sim profile: latency, time to first token, escalation, frontier
share, cost and energy against frontier-only, and the tokens that cancelled calls spent.

Starts a real local Ray + Serve with the ``sim`` profile (fake engines with latency models
and seeded token logprobs; the trained router), then sends the same chat prompts, streamed,
under each strategy and once straight to the frontier (the frontier-only baseline):

    python -m benchmarks.strategies --requests 150 --concurrency 8

Also deployed: the sim profile with ``gate.min_tokens: 8`` (the gate decides on the first 8
tokens and streams the rest), as the row ``cascade@prefix8``.

Targets checked at the end:
- over escalated requests, race's p95 latency within 10% of the frontier alone on the same
  prompts; cascade's higher by about the small model's time (its gate decision time);
- every frontier call a race cancelled generated no more tokens than the frontier produces
  in the gate's decision time plus 50 ms (from the fake engine's own abort records).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.stats import percentile, table

LABELS = Path(__file__).resolve().parent.parent / "router_models" / "data" / "sharegpt_chat_labels.jsonl"
VARIANTS = [("frontier-only", "", None), ("route", "", "route"), ("cascade", "", "cascade"), ("race", "", "race"),
            ("cascade@prefix8", "/prefix", "cascade"), ("race@prefix8", "/prefix", "race")]


@dataclass
class Result:
    index: int
    status: int
    latency_s: float
    ttft_s: float | None
    headers: dict[str, str]
    trailer: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None


def prompts(n: int) -> list[str]:
    """n chat prompts, spread over the labelled file by a hash, cut to 1,000 characters."""
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    return [r["prompt"][:1000] for r in rows[:n]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client: httpx.AsyncClient, prefix: str, strategy: str | None, i: int, prompt: str, tag: str) -> Result:
    model = "frontier" if strategy is None else "auto"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = {"x-request-id": f"{tag}-{i}"}
    if strategy is not None:
        headers["x-slm-strategy"] = strategy
    t0 = time.perf_counter()
    ttft = None
    trailer: dict[str, str] = {}
    async with client.stream("POST", f"{prefix}/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Result(i, resp.status_code, time.perf_counter() - t0, None, dict(resp.headers),
                          error_code=resp.json()["error"]["code"])
        async for line in resp.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t0
            elif line.startswith(": x-slm-trailer "):
                trailer = json.loads(line.removeprefix(": x-slm-trailer "))
        return Result(i, resp.status_code, time.perf_counter() - t0, ttft, dict(resp.headers), trailer)


async def _run(base_url: str, prefix: str, strategy: str | None, texts: list[str], concurrency: int, tag: str) -> list[Result]:
    queue = iter(enumerate(texts))
    out: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            for i, text in queue:
                out.append(await _one(client, prefix, strategy, i, text, tag))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(out, key=lambda r: r.index)


def _engine_stats(app: str, deployments: list[str]) -> dict[str, dict]:
    from ray import serve

    return {d: serve.get_deployment_handle(d, app_name=app).stats.remote().result(timeout_s=30) for d in deployments}


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


def tokens_by(t_s: float, ttft_s: float, tokens_per_s: float) -> int:
    """Tokens the fake frontier has generated t seconds after its start."""
    return 0 if t_s < ttft_s else 1 + int((t_s - ttft_s) * tokens_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=150, help="prompts per strategy")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.loader import config_from_dict, resolve_config
    from deployments.app import build_from_config

    cfg = resolve_config(profile="sim", path=None, inline=None)
    prefix_cfg = config_from_dict(
        {**cfg.model_dump(mode="json"), "name": "simprefix", "strategy": {**cfg.strategy.model_dump(mode="json"), "gate": {"min_tokens": 8}}}
    )
    frontier = cfg.frontier.current
    deployments = cfg.deployment_names()
    texts = prompts(args.requests)

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}"
    results: dict[str, list[Result]] = {}
    spent: dict[str, dict[str, dict]] = {}
    started = time.monotonic()
    try:
        serve.run(build_from_config(cfg), name="sim", route_prefix="/")
        serve.run(build_from_config(prefix_cfg), name="simprefix", route_prefix="/prefix")
        for prefix in ("", "/prefix"):  # warm up routers and connections
            asyncio.run(_run(base_url, prefix, "route", texts[:16], args.concurrency, "warm"))
        for name, prefix, strategy in VARIANTS:
            app = "simprefix" if prefix else "sim"
            before = _engine_stats(app, deployments)
            results[name] = asyncio.run(_run(base_url, prefix, strategy, texts, args.concurrency, name))
            time.sleep(2.0)  # let the last aborts land in the engines' records
            after = _engine_stats(app, deployments)
            spent[name] = {"before": before, "after": after}
            print(f"{name}: {len(results[name])} requests ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        with contextlib.suppress(RuntimeError):
            serve.shutdown()
        ray.shutdown()

    alone = {r.index: r for r in results["frontier-only"]}
    alone_cost = sum(float(r.headers.get("x-slm-cost-usd", r.trailer.get("x-slm-cost-usd", 0))) for r in alone.values())
    alone_energy = sum(float(r.trailer.get("x-slm-energy-j", 0)) for r in alone.values())
    rows = []
    checks = []
    for name, _, _ in VARIANTS:
        res = results[name]
        ok = [r for r in res if r.status == 200]
        esc = [r for r in ok if r.headers.get("x-slm-escalated") == "true"]
        stats = spent[name]
        fr = frontier_name = f"{cfg.frontier.name}-{frontier.name}"
        started_calls = sum(stats["after"][fr][k] - stats["before"][fr][k] for k in ("completed", "aborted"))
        cancelled_tokens = sum(stats["after"][d]["aborted_tokens"] - stats["before"][d]["aborted_tokens"] for d in deployments)
        cost = sum(float(r.trailer.get("x-slm-cost-usd", 0)) for r in ok)
        energy = sum(float(r.trailer.get("x-slm-energy-j", 0)) for r in ok)
        rows.append(
            {
                "strategy": name,
                "ok": f"{len(ok)}/{len(res)}",
                "p50_ms": _ms([r.latency_s for r in ok], 50),
                "p95_ms": _ms([r.latency_s for r in ok], 95),
                "ttft_p50": _ms([r.ttft_s for r in ok if r.ttft_s is not None], 50),
                "ttft_p95": _ms([r.ttft_s for r in ok if r.ttft_s is not None], 95),
                "esc_p50": _ms([r.latency_s for r in esc], 50),
                "esc_p95": _ms([r.latency_s for r in esc], 95),
                "esc_ttft_p50": _ms([r.ttft_s for r in esc if r.ttft_s is not None], 50),
                "escalated": f"{len(esc) / max(1, len(ok)):.1%}",
                "frontier_share": f"{started_calls / max(1, len(res)):.1%}",
                "usd_per_req": f"{cost / max(1, len(ok)):.2e}",
                "vs_frontier": f"{cost / alone_cost:.1%}" if alone_cost else "-",
                "J_per_req": f"{energy / max(1, len(ok)):.1f}",
                "J_vs_frontier": f"{energy / alone_energy:.1%}" if alone_energy else "-",
                "cancelled_tokens": cancelled_tokens,
            }
        )
        if name in ("race", "cascade") and esc:
            mine = percentile([r.latency_s for r in esc], 95)
            base = percentile([alone[r.index].latency_s for r in esc], 95)
            decided = percentile([float(r.headers["x-slm-decided-ms"]) / 1000 for r in esc], 50)
            checks.append(
                f"{name}: escalated p95 {mine * 1000:.0f} ms vs frontier alone on the same prompts {base * 1000:.0f} ms "
                f"({(mine / base - 1):+.1%}); median gate decision time {decided * 1000:.0f} ms"
            )
        if name == "race":
            aborts = {a["request_id"]: a for a in stats["after"][frontier_name]["recent_aborts"]}
            cancelled = [r for r in ok if r.headers.get("x-slm-cancelled", "").find(frontier_name) >= 0]
            over = []
            for r in cancelled:
                abort = aborts.get(f"race-{r.index}:{frontier_name}")
                if abort is None:
                    continue
                bound = tokens_by(float(r.headers["x-slm-decided-ms"]) / 1000 + 0.05, frontier.engine.ttft_ms / 1000, frontier.engine.tokens_per_s)
                if abort["tokens"] > bound:
                    over.append((r.index, abort["tokens"], bound))
            found = sum(1 for r in cancelled if f"race-{r.index}:{frontier_name}" in aborts)
            checks.append(
                f"race: {len(cancelled)} frontier calls cancelled, {found} of them in the engine's abort records "
                f"(a call cancelled before its replica started it leaves none); "
                f"over the bound (tokens by decision time + 50 ms): {len(over)} {over[:5]}"
            )

    print()
    print(f"sim profile, {args.requests} chat prompts per strategy, concurrency {args.concurrency}, streamed; "
          f"frontier: TTFT {frontier.engine.ttft_ms:.0f} ms, {frontier.engine.tokens_per_s:.0f} tokens/s")
    print(table(rows, list(rows[0])))
    for name, _, _ in VARIANTS:
        refused = [f"{r.status} {r.error_code} (x-slm-pii: {r.headers.get('x-slm-pii', '-')})" for r in results[name] if r.status != 200]
        if refused:
            print(f"{name}: not 200: {refused}")
    print()
    for line in checks:
        print(line)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows, "checks": checks}, indent=2))


if __name__ == "__main__":
    main()
