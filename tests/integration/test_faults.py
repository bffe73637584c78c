"""Faults survived (docs/faults.md), each under traffic through a real gateway on Serve with
fake engines, each printing and asserting its figures: requests sent, succeeded, failed,
hung (every request has a client timeout, so a hang is counted, never waited for).

- a model replica killed under load: requests without a token yet are retried once on the
  other replica (``slm_retried_calls_total``); a stream that breaks after tokens ends with
  an error event;
- the frontier's circuit breaker: opens after its failures, escalations keep the small
  answer (``x-slm-escalated: failed``), a request naming the frontier gets a 503 at once;
- Redis restarted under load: no request fails, the split survives and changes again after;
- a stalled engine: the deadline fires (504), the replica's health check reports the stall,
  and the slot is freed for the next request.

Run: flock /tmp/slm-ray.lock .venv/bin/python -m pytest tests/integration/test_faults.py -s
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest

from cluster.loader import config_from_dict
from tests.integration.support import SPLITS_PREFIX, RedisServer, scrape, total, write_split

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 15.0  # a request not answered by then counts as hung


def _fake(name: str, **engine: Any) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 8, **engine}, "resources": {"num_cpus": 0.05}}


def _app(name: str, code_versions: list[dict], frontier: dict | None = None, **extra: Any) -> dict:
    models = [
        {"name": "code", "role": "specialist", "domains": ["code"], "versions": code_versions},
        {"name": "general", "role": "general", "versions": [_fake("v1")]},
    ]
    if frontier is not None:
        models.append({"name": "frontier", "role": "frontier", "versions": [frontier]})
    gateway = {"resources": {"num_cpus": 0.05}, "first_token_timeout_s": 5, "request_timeout_s": 10, **extra.pop("gateway", {})}
    return {"name": name, "models": models, "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}}, "gateway": gateway, **extra}


TWO = {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}
APPS = {
    # 2 replicas of code-v1: 0.2 s to the first token, then the answer at once, so a
    # request on the killed replica has almost always no token yet.
    "kill": ("/kill", _app("kill", [{**_fake("v1", ttft_ms=200), **TWO},
                                    # a slow stream on one replica, killed after its first tokens
                                    _fake("slow", tokens_per_s=4, default_completion_tokens=40)])),
    "breaker": ("/breaker", _app(
        "breaker", [_fake("unsure", unsure_share=1.0)],
        frontier=_fake("v1", failure_rate=1.0, failure_error="unavailable"),
        strategy={"frontier_breaker": {"failures": 3, "window_s": 30, "cooldown_s": 3}},
    )),
    "stall": ("/stall", _app(
        "stall", [{**_fake("v1", tokens_per_s=50, stall_rate=1.0, stall_s=30), "max_ongoing_requests": 1, "stall_unhealthy_s": 1}],
        gateway={"stream_idle_timeout_s": 3},
    )),
}


@pytest.fixture(scope="module")
def faults_ray(redis_server: RedisServer, metrics_ray: dict) -> Iterator[dict]:
    """``metrics_ray`` (a fresh Ray with a metrics port: the retry counter is read from it) with the apps."""
    from ray import serve

    from deployments.app import build_from_config

    apps = dict(APPS)
    apps["redis"] = ("/redis", _app(
        "redis", [_fake("v1"), _fake("v3")],
        redis={"url": redis_server.url, "key_prefix": SPLITS_PREFIX, "poll_interval_s": 0.1, "timeout_s": 0.3},
    ))
    for name, (prefix, cfg) in apps.items():
        serve.run(build_from_config(config_from_dict(cfg)), name=name, route_prefix=prefix)
    yield metrics_ray


# --- traffic --------------------------------------------------------------------------------------


@dataclass
class Result:
    at: float
    status: int | None  # None: no answer within the client timeout (hung) or a broken connection
    error: str | None = None  # the error code (body or stream event)
    headers: dict[str, str] = field(default_factory=dict)
    hung: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def ask(client: httpx.Client, url: str, *, stream: bool, model: str = "code", max_tokens: int = 8,
        headers: dict[str, str] | None = None, user: str | None = None) -> Result:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "write a python function"}],
                            "max_tokens": max_tokens, "stream": stream}
    if user is not None:
        body["user"] = user
    at = time.monotonic()
    try:
        if not stream:
            r = client.post(url, json=body, headers=headers or {})
            err = r.json().get("error") if r.status_code != 200 else None
            return Result(at, r.status_code, err and err.get("code"), dict(r.headers))
        with client.stream("POST", url, json=body, headers=headers or {}) as r:
            if r.status_code != 200:
                r.read()
                return Result(at, r.status_code, (r.json().get("error") or {}).get("code"), dict(r.headers))
            error, done = None, False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line:
                    error = json.loads(line[6:])["error"]["code"]
            return Result(at, 200, error or (None if done else "no_done"), dict(r.headers))
    except httpx.TimeoutException:
        return Result(at, None, "client_timeout", hung=True)
    except httpx.HTTPError as exc:
        return Result(at, None, type(exc).__name__)


class Load:
    """``threads`` loops sending one request at a time (streamed and not, alternating) until
    stopped or ``max_requests`` in all: bounded either way."""

    def __init__(self, url: str, threads: int = 6, max_requests: int = 2000, **kw: Any) -> None:
        self.url, self.max_requests, self.kw = url, max_requests, kw
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(CLIENT_TIMEOUT_S, connect=2.0)) as client:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.results) >= self.max_requests:
                        return
                res = ask(client, self.url, stream=i % 2 == 1, user=f"u{i}-{len(self.results)}", **self.kw)
                with self._lock:
                    self.results.append(res)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)

    def figures(self) -> dict[str, Any]:
        failed = [r for r in self.results if not r.ok]
        return {
            "sent": len(self.results), "succeeded": sum(r.ok for r in self.results), "failed": len(failed),
            "hung": sum(r.hung for r in self.results), "failures": dict(Counter(f"{r.status} {r.error}" for r in failed)),
        }


def report(name: str, figures: dict[str, Any]) -> None:
    print(f"\n[faults] {name}: {json.dumps(figures)}")


def replica_actors(app: str, deployment: str) -> list[dict[str, str]]:
    """The replica actors of a deployment, by the names Serve gives them
    (``SERVE_REPLICA::app#deployment#id``; no dashboard needed, unlike the state API)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _actor(actor: dict[str, str]) -> Any:
    import ray

    return ray.get_actor(actor["name"], namespace=actor["namespace"])


def kill(actor: Any) -> None:
    import ray

    ray.kill(_actor(actor), no_restart=True)


def wait_for(check, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s} s")


# --- tests -------------------------------------------------------------------------------------------


def test_a_replica_killed_under_load_loses_under_one_percent_and_nothing_hangs(faults_ray: dict) -> None:
    base = faults_ray["base_url"]
    url = f"{base}/kill/v1/chat/completions"
    assert len(replica_actors("kill", "code-v1")) == 2
    # Counts, not fixed sleeps, decide when to kill and when to stop: a slow or busy host
    # sends fewer requests a second, and the figures must hold whatever its speed.
    with Load(url) as load:
        wait_for(lambda: len(load.results) >= 30, 30, "30 answers before the kill")
        killed_at = time.monotonic()
        victim = replica_actors("kill", "code-v1")[0]
        kill(victim)
        wait_for(lambda: sum(r.at >= killed_at for r in load.results) >= 30, 30, "30 answers after the kill")
    figures = load.figures()
    figures["after_kill"] = sum(r.at >= killed_at for r in load.results)
    report("replica killed under load", figures)  # before the counter's wait, so a failure there shows them
    # the retries, as the gateway counts them (summed every 0.5 s; Ray exports about once a second)
    retried = wait_for(
        lambda: total(scrape(faults_ray["scrape_url"]), "ray_slm_retried_calls_total"), 30, "the retry counter")
    figures["retried_calls"] = retried
    report("replica killed under load: retries", {"retried_calls": retried})
    assert figures["hung"] == 0, figures
    assert figures["sent"] >= 60 and figures["after_kill"] >= 30, figures
    assert figures["succeeded"] >= 0.99 * figures["sent"], figures
    assert retried >= 1, figures  # requests did land on the dead replica, and were saved


def test_a_stream_broken_after_tokens_ends_with_an_error_event(faults_ray: dict) -> None:
    base = faults_ray["base_url"]
    url = f"{base}/kill/v1/chat/completions"
    body = {"model": "code@slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
    events: list[str] = []
    started = time.monotonic()
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:  # the role delta and two tokens: the answer is streaming
                    kill(replica_actors("kill", "code-slow")[0])
    took = time.monotonic() - started
    last = json.loads(events[-1])
    report("stream broken after tokens", {"events": len(events), "last": last, "seconds": round(took, 1)})
    assert len(events) >= 3 and "[DONE]" not in events
    assert last["error"]["code"] == "replica_unavailable" and last["error"]["type"] == "service_unavailable"
    assert took < 8  # the 40-token answer would take 10 s: it ended at the kill, it did not hang


def test_the_frontier_breaker_opens_keeps_small_answers_and_refuses_named_calls(faults_ray: dict) -> None:
    from ray import serve

    base = faults_ray["base_url"]
    url = f"{base}/breaker/v1/chat/completions"
    frontier = serve.get_deployment_handle("frontier-v1", app_name="breaker")

    def frontier_calls() -> int:
        return frontier.stats.remote().result(timeout_s=10)["aborted"]  # every call fails before its first token

    results: list[Result] = []
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for i in range(8):
            results.append(ask(client, url, stream=i % 2 == 1, headers={"x-slm-strategy": "cascade"}))
        tried = frontier_calls()
        t0 = time.monotonic()
        named = ask(client, url, stream=False, model="frontier")
        named_s = time.monotonic() - t0
        time.sleep(3.2)  # the cooldown: one trial call goes, fails, and the breaker opens again
        results.append(ask(client, url, stream=False, headers={"x-slm-strategy": "cascade"}))
        results.append(ask(client, url, stream=False, headers={"x-slm-strategy": "cascade"}))
        after_cooldown = frontier_calls()
    figures = {
        "sent": len(results) + 1, "succeeded": sum(r.ok for r in results), "failed": sum(not r.ok for r in results) + 1,
        "hung": sum(r.hung for r in results), "escalated": dict(Counter(r.headers.get("x-slm-escalated") for r in results)),
        "frontier_calls_before_open": tried, "frontier_calls_after_cooldown": after_cooldown,
        "named_frontier": {"status": named.status, "code": named.error, "retry_after": named.headers.get("retry-after"),
                           "seconds": round(named_s, 3)},
    }
    report("frontier circuit breaker", figures)
    assert all(r.ok and r.headers.get("x-slm-escalated") == "failed" for r in results), figures
    assert tried == 3 and after_cooldown == 4, figures  # 3 failures open it; one trial after the cooldown
    assert (named.status, named.error) == (503, "frontier_circuit_open"), figures
    assert named.headers.get("retry-after") in ("1", "2", "3") and named_s < 1.0, figures


def test_redis_restarted_under_load_fails_no_request_and_splits_recover(faults_ray: dict, redis_server: RedisServer) -> None:
    base = faults_ray["base_url"]
    url = f"{base}/redis/v1/chat/completions"
    write_split(redis_server, {"v1": 20, "v3": 80})
    with httpx.Client(timeout=10) as client:
        wait_for(lambda: client.get(f"{base}/redis/v1/slm/traffic").json()["splits"].get("code") == {"v1": 20, "v3": 80}, 10, "split")
        with Load(url, threads=4) as load:
            time.sleep(1.0)
            redis_server.stop()
            down_at = time.monotonic()
            wait_for(lambda: not client.get(f"{base}/redis/v1/slm/traffic").json()["healthy"], 10, "the gateway seeing Redis down")
            time.sleep(1.5)
            redis_server.start()
            up_at = time.monotonic()
            wait_for(lambda: client.get(f"{base}/redis/v1/slm/traffic").json()["healthy"], 10, "the gateway seeing Redis back")
            write_split(redis_server, {"v1": 100})
            recovered = wait_for(
                lambda: client.get(f"{base}/redis/v1/slm/traffic").json()["splits"].get("code") == {"v1": 100}, 10, "the new split")
            time.sleep(0.5)
    figures = load.figures()
    during = [r for r in load.results if down_at <= r.at < up_at]
    figures.update({"sent_while_down": len(during), "versions_while_down": dict(Counter(r.headers.get("x-slm-version") for r in during)),
                    "split_recovered": bool(recovered)})
    report("redis restarted under load", figures)
    assert figures["failed"] == 0 and figures["hung"] == 0, figures
    assert len(during) >= 10, figures
    assert set(figures["versions_while_down"]) <= {"v1", "v3"} and "v3" in figures["versions_while_down"], figures  # the last split


def test_a_stalled_engine_times_out_reports_unhealthy_and_frees_its_slot(faults_ray: dict) -> None:
    from ray import serve

    base = faults_ray["base_url"]
    url = f"{base}/stall/v1/chat/completions"
    model = serve.get_deployment_handle("code-v1", app_name="stall")
    (actor,) = replica_actors("stall", "code-v1")
    replica = _actor(actor)  # the health check as Serve's controller calls it: not queued behind requests
    box: dict[str, Result] = {}
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        t = threading.Thread(target=lambda: box.setdefault("r", ask(client, url, stream=False)), daemon=True)
        started = time.monotonic()
        t.start()
        # the generation streams a token or more, then stalls: after 1 s the health check says so
        unhealthy = wait_for(lambda: _health_error(replica), 2.5, "the health check reporting the stall")
        t.join(timeout=CLIENT_TIMEOUT_S + 2)
        took = time.monotonic() - started
        stalled = box.get("r", Result(started, None, "client_timeout", hung=True))
        # the gateway's deadline cancelled the generation: the slot (max_ongoing_requests 1) is free
        wait_for(lambda: model.stats.remote().result(timeout_s=10)["active"] == 0, 5, "the engine's slot freed")
        healthy_again = _health_error(replica) is None
        t1 = time.monotonic()
        nxt = ask(client, url, stream=False, max_tokens=1)  # one token: it cannot stall
        next_s = time.monotonic() - t1
    figures = {
        "sent": 2, "succeeded": int(nxt.ok), "failed": int(not stalled.ok), "hung": int(stalled.hung) + int(nxt.hung),
        "stalled": {"status": stalled.status, "code": stalled.error, "seconds": round(took, 1)},
        "health_during_stall": unhealthy, "healthy_after": healthy_again, "next_request_s": round(next_s, 2),
    }
    report("stalled engine", figures)
    assert (stalled.status, stalled.error) == (504, "engine_timeout") and took < 6, figures  # idle limit 3 s, not the 30 s stall
    assert "stalled" in unhealthy, figures
    assert healthy_again and nxt.ok and next_s < 2, figures


def _health_error(replica: Any) -> str | None:
    import ray

    try:
        ray.get(replica.check_health.remote(), timeout=5)
    except Exception as exc:  # noqa: BLE001 - the replica's health error, as Serve would see it
        return str(exc).strip().splitlines()[-1]  # the error's own line, under Ray's traceback
    return None
