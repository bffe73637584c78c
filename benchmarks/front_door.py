"""Front door speed: slm-cluster's gateway against a bare Ray Serve passthrough, in one run.

Starts a local Ray + Serve and a zero-latency OpenAI-compatible upstream (a canned-answer
HTTP/1.1 server in its own process, so its CPU is not the driver's), then serves two
applications in the same Serve instance:

- ``passthrough`` (route prefix ``/pt``): one FastAPI ingress deployment that forwards
  ``POST /v1/chat/completions`` with httpx to the upstream and returns its answer;
- ``slm`` (route prefix ``/``): slm-cluster built from ``cluster_config()`` below: the gateway, the
  router and one ``remote_openai`` ModelServer (``remote``) pointed at the same upstream;
- ``slm-in`` (route prefix ``/in``): the same, with the ``remote`` version run in the
  gateway (``runs_in: gateway``, no ModelServer deployment: one Serve hop fewer).

It measures, non-streamed, over a bounded load loop (httpx async, ``--requests`` per cell
after a warm-up, ``--rounds`` rounds with the targets interleaved, medians reported):
requests/s at 16 concurrent clients and p50 at one client, for the passthrough, slm-cluster
with ``model: remote`` (named) on each app and, for information, ``model: auto``. Then the ratios
against the targets: rps >= 0.9x the passthrough's at 16 clients, p50 at one client
<= 1.15x the passthrough's. Ray starts with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` for both
sides, as ``slmctl up`` does by default (``--no-throughput-optimized`` to compare).

    .venv/bin/python -m benchmarks.front_door --requests 200 --rounds 2

Each 16-client cell also records the CPU seconds every process of the run spent (this
driver and its descendants: Ray's processes, the upstream), per request. ``--py-spy DIR``
then records the gateways (both apps), the ModelServer, the passthrough replica, the proxy and the
controller with py-spy under 16 clients for ``--profile-s`` seconds each, writing folded
stacks (``*.folded``) and a top-functions summary (``*.top.txt``) to DIR (py-spy must be
installed and allowed to ptrace). Figures and reading: docs/benchmarks.md, "Front door".
"""

# No ``from __future__ import annotations``: serve.ingress pickles a copy of the FastAPI
# app, and string annotations (``request: Request``) would not resolve in the replica.
import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from benchmarks.stats import percentile, table

REMOTE = "remote"
ANSWER_TOKENS = 16
PROMPT = "Write a Python function that reverses a list."


def cluster_config(upstream_base_url: str, runs_in: str = "deployment") -> dict[str, Any]:
    """slm-cluster with one ``remote_openai`` model (the general one, so ``auto`` can reach
    it), the keyword router, no Redis; ``pii: detect`` and the other defaults as shipped."""
    version = {
        "name": "v1",
        "engine": {"kind": "remote_openai", "base_url": upstream_base_url, "model": "upstream-model"},
        "resources": {"num_cpus": 0.1},
        "max_ongoing_requests": 256,
        "runs_in": runs_in,
    }
    return {
        "name": "frontdoor" if runs_in == "deployment" else "frontdoor_in",
        "models": [{"name": REMOTE, "role": "general", "versions": [version]}],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.1}},
        "gateway": {"resources": {"num_cpus": 0.1}},
    }


# --- the zero-latency upstream -------------------------------------------------------------


def _completion_bytes(model: str) -> bytes:
    text = " ".join(["word"] * ANSWER_TOKENS)
    body = {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": ANSWER_TOKENS, "total_tokens": 9 + ANSWER_TOKENS},
    }
    return json.dumps(body).encode()


def _stream_bytes(model: str) -> bytes:
    """The same answer as SSE (one event per token, a finish event, usage, [DONE])."""
    events = []
    for i in range(ANSWER_TOKENS):
        delta = {"content": ("" if i == 0 else " ") + "word"}
        events.append({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    events.append({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": ANSWER_TOKENS, "total_tokens": 9 + ANSWER_TOKENS}})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               answers: dict[bool, bytes]) -> None:
    """HTTP/1.1 keep-alive: read a request (headers + Content-Length body), answer at once."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            stream = bool(json.loads(body or b"{}").get("stream"))
            payload = answers[stream]
            ctype = b"text/event-stream" if stream else b"application/json"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int) -> None:
    """Runs the upstream until killed (the benchmark runs this in a child process)."""
    answers = {False: _completion_bytes("upstream-model"), True: _stream_bytes("upstream-model")}

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _upstream_connection(r, w, answers), "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def upstream_process():  # type: ignore[no-untyped-def]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.front_door", "--serve-upstream", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "upstream did not start"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- the passthrough -----------------------------------------------------------------------


_passthrough_api = FastAPI()


@serve.ingress(_passthrough_api)
class Passthrough:
    """A bare one-deployment Serve app: FastAPI ingress, httpx forward of the body, the
    upstream's status, body and content type back. Nothing else: the floor to compare with.
    (Module level, so replicas import it by name and FastAPI resolves its annotations.)"""

    def __init__(self, base_url: str) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits, trust_env=False)

    @_passthrough_api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        up = await self.client.post("/chat/completions", content=await request.body(), headers={"content-type": "application/json"})
        return Response(up.content, status_code=up.status_code, media_type=up.headers.get("content-type"))

    @_passthrough_api.get("/pid")
    async def pid(self) -> dict[str, int]:
        return {"pid": os.getpid()}


def build_passthrough(upstream_base_url: str, *, max_ongoing_requests: int = 256, num_cpus: float = 0.1):  # type: ignore[no-untyped-def]
    """The passthrough application, bound to the upstream's API root."""
    deployment = serve.deployment(Passthrough, name="Passthrough")
    return deployment.options(max_ongoing_requests=max_ongoing_requests, ray_actor_options={"num_cpus": num_cpus}).bind(upstream_base_url)


# --- load ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(call: Callable[[], Awaitable[None]], concurrency: int, total: int) -> tuple[list[float], float]:
    """``total`` calls from ``concurrency`` workers (a bounded loop); latencies and wall time."""
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


def _caller(client: httpx.AsyncClient, path: str, model: str) -> Callable[[], Awaitable[None]]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": ANSWER_TOKENS}

    async def call() -> None:
        resp = await client.post(path, json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.text[:300]}")
        assert resp.json()["choices"][0]["message"]["content"].count("word") == ANSWER_TOKENS

    return call


TARGETS = [("passthrough", "/pt/v1/chat/completions", "upstream-model"),
           ("slm named", "/v1/chat/completions", REMOTE),
           ("slm named, in gateway", "/in/v1/chat/completions", REMOTE),
           ("slm auto", "/v1/chat/completions", "auto"),
           ("slm auto, in gateway", "/in/v1/chat/completions", "auto")]


def _process_name(proc: Any) -> str:
    cmd = proc.cmdline()
    title = " ".join(cmd).strip()
    if title.startswith("ray::"):  # the title names the running method too: ray::ServeController.listen_for_change
        return title.split()[0][5:].split(".")[0]
    if "--serve-upstream" in cmd:
        return "upstream"
    return "driver (load client)" if proc.pid == os.getpid() else os.path.basename(cmd[0]) if cmd else "?"


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and all its descendants (Ray's
    processes, the upstream), by pid, with the process's name."""
    import psutil

    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[proc.pid] = (_process_name(proc), t.user + t.system)
    return out


async def measure(base_url: str, requests: int, rounds: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    cells: dict[tuple[str, int], list[tuple[list[float], float]]] = {}
    cpu: dict[str, dict[str, float]] = {}  # path -> process -> CPU seconds, over the 16-client cells
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits, trust_env=False) as client:
        calls = {name: _caller(client, path, model) for name, path, model in TARGETS}
        for fn in calls.values():
            await _drive(fn, 4, 60)  # warm up connections, handles and replicas
        for _ in range(rounds):  # interleaved, so a noisy neighbour hits every target alike
            for name, fn in calls.items():
                for c in (1, 16):
                    before = cpu_snapshot()
                    cells.setdefault((name, c), []).append(await _drive(fn, c, requests))
                    if c == 16:
                        after = cpu_snapshot()
                        acc = cpu.setdefault(name, {})
                        for pid, (proc, secs) in after.items():  # a process new since `before` counts from 0
                            acc[proc] = acc.get(proc, 0.0) + secs - before.get(pid, (proc, 0.0))[1]
    rows = []
    for (name, c), runs in cells.items():
        rows.append({
            "path": name, "concurrency": c, "requests": sum(len(lat) for lat, _ in runs),
            "p50_ms": round(statistics.median(percentile(lat, 50) for lat, _ in runs) * 1000, 2),
            "p99_ms": round(statistics.median(percentile(lat, 99) for lat, _ in runs) * 1000, 2),
            "rps": round(statistics.median(len(lat) / wall for lat, wall in runs), 1),
        })
    return rows, {name: {p: 1000 * secs / (requests * rounds) for p, secs in per.items()} for name, per in cpu.items()}


def cpu_table(cpu: dict[str, dict[str, float]]) -> str:
    """CPU milliseconds per request, by process, at 16 clients (processes above 0.05 ms)."""
    procs = sorted({p for per in cpu.values() for p in per}, key=lambda p: -max(per.get(p, 0) for per in cpu.values()))
    rows = []
    for p in procs:
        if max(per.get(p, 0) for per in cpu.values()) >= 0.05:
            rows.append({"process": p, **{name: round(per.get(p, 0.0), 2) for name, per in cpu.items()}})
    rows.append({"process": "total", **{name: round(sum(per.values()), 2) for name, per in cpu.items()}})
    return table(rows, ["process", *cpu])


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["path"], r["concurrency"]): r for r in rows}
    pt16, pt1 = by[("passthrough", 16)], by[("passthrough", 1)]
    lines = []
    for name in dict.fromkeys(r["path"] for r in rows if r["path"] != "passthrough"):  # in the rows' order
        rps = by[(name, 16)]["rps"] / pt16["rps"]
        p50 = by[(name, 1)]["p50_ms"] / pt1["p50_ms"]
        tag = " (information)" if "auto" in name else ""
        lines.append(f"{name}{tag}: rps at 16 = {rps:.2f}x passthrough (target >= 0.90: {'PASS' if rps >= 0.9 else 'FAIL'}), "
                     f"p50 at 1 = {p50:.2f}x passthrough (target <= 1.15: {'PASS' if p50 <= 1.15 else 'FAIL'})")
    return lines


# --- profile -------------------------------------------------------------------------------


async def _pid(base_url: str, path: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as client:
        return int((await client.get(path)).json()["pid"])


def _replica_pid(deployment: str, prefix: str = "ServeReplica") -> int:
    """A replica's process, by the title Ray gives it (``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    titles = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or ())
        if prefix in title:
            titles.append(title)
            if f":{deployment}" in title or (prefix == "ray::" and title.startswith(f"ray::{deployment}")):
                return proc.pid
    raise RuntimeError(f"no replica process of {deployment} among {titles}")


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, when it is not on PATH
    return str(beside) if beside.exists() else "py-spy"


async def profile(base_url: str, out: Path, seconds: float, targets: list[tuple[str, int, str, str]]) -> None:
    """py-spy records each (name, pid, path, model) replica, non-blocking sampling, while 16
    clients load that path."""
    out.mkdir(parents=True, exist_ok=True)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits, trust_env=False) as client:
        for name, pid, path, model in targets:
            raw = out / f"{name}.folded"
            spy = await asyncio.create_subprocess_exec(
                _py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                "--format", "raw", "--nonblocking", "--output", str(raw),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            call = _caller(client, path, model)
            deadline = time.monotonic() + seconds + 1
            while spy.returncode is None and time.monotonic() < deadline + 10:
                await _drive(call, 16, 64)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(spy.wait(), 0.01)
            await spy.wait()
            (out / f"{name}.top.txt").write_text(summarise(raw))


def summarise(folded: Path, top: int = 40) -> str:
    """Self time and inclusive time per function, as shares of all samples."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    lines = [f"{total} samples", "", "inclusive %  function"]
    lines += [f"{100 * n / total:6.1f}       {f}" for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", "self %  function"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------


def report(rows: list[dict[str, Any]], cpu: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    mode = "default Serve settings" if args.no_throughput_optimized else "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"
    print(f"zero-latency upstream, {ANSWER_TOKENS}-token answers, non-streamed, {mode}, "
          f"{args.rounds} rounds x {args.requests} requests per cell (medians)")
    print(table(rows, ["path", "concurrency", "requests", "p50_ms", "p99_ms", "rps"]))
    print()
    for line in verdict(rows):
        print(line)
    print()
    print("CPU ms per request at 16 clients, by process (all rounds):")
    print(cpu_table(cpu))
    sys.stdout.flush()
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows, "cpu_ms_per_request": cpu}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per (path, concurrency) cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-throughput-optimized", action="store_true", help="leave RAY_SERVE_THROUGHPUT_OPTIMIZED unset")
    parser.add_argument("--py-spy", type=Path, help="write py-spy profiles of the replicas here")
    parser.add_argument("--profile-s", type=float, default=10)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    if not args.no_throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # before Ray starts: every process inherits it

    import ray

    from cluster.loader import config_from_dict
    from deployments.app import build_from_config

    with upstream_process() as upstream:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        try:
            gateway_max = config_from_dict(cluster_config(upstream)).gateway.max_ongoing_requests
            serve.run(build_passthrough(upstream, max_ongoing_requests=gateway_max), name="passthrough", route_prefix="/pt")
            serve.run(build_from_config(config_from_dict(cluster_config(upstream))), name="slm", route_prefix="/")
            serve.run(build_from_config(config_from_dict(cluster_config(upstream, "gateway"))), name="slm-in", route_prefix="/in")
            rows, cpu = asyncio.run(measure(base, args.requests, args.rounds))
            report(rows, cpu, args)
            if args.py_spy:
                pt = asyncio.run(_pid(base, "/pt/pid"))
                named = ("/v1/chat/completions", REMOTE)
                asyncio.run(profile(base, args.py_spy, args.profile_s, [
                    ("gateway", _replica_pid("slm:gateway"), *named), ("model-server", _replica_pid(f"slm:{REMOTE}-v1"), *named),
                    ("gateway-in", _replica_pid("slm-in:gateway"), "/in/v1/chat/completions", REMOTE),
                    ("passthrough", pt, "/pt/v1/chat/completions", "upstream-model"),
                    ("proxy-slm", _replica_pid("ProxyActor", prefix="ray::"), *named),
                    ("proxy-passthrough", _replica_pid("ProxyActor", prefix="ray::"), "/pt/v1/chat/completions", "upstream-model"),
                    ("controller-slm", _replica_pid("ServeController", prefix="ray::"), *named)]))
        finally:
            with contextlib.suppress(RuntimeError):  # see benchmarks/gateway_overhead.py
                serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
