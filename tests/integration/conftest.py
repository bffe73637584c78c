"""A real local Ray + Serve for integration tests (loopback only, bounded waits)."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest) -> Iterator[dict]:
    """A fresh in-process Ray instance (never one a developer started by hand).

    A module may set ``RAY_INIT = {"num_gpus": 1, ...}`` to declare logical resources.
    """
    ray = pytest.importorskip("ray")
    from ray import serve

    opts = {"num_cpus": 4, **getattr(request.module, "RAY_INIT", {})}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **opts)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield {"port": port, "base_url": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()
