"""The gateway's side of API keys: who is calling, what they may reach, and their limits.

Two kinds of key are accepted. The env-var keys of ``gateway.api_keys_env`` are unscoped and
unlimited. With ``gateway.keys.managed``, the keys that ``slmctl keys create`` stored
(hashed) in Redis are too, each with its scope and limits (``cluster.keys``;
docs/api_keys.md). A request's limits are reserved before its calls (``admit``) and settled
with the real usage and cost after (``settle``), both as Lua scripts in Redis that every
gateway replica shares (``cluster.key_store``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from cluster import keys
from cluster.config import ClusterConfig
from cluster.errors import AuthenticationError, ConfigError, ModelNotAllowedError
from cluster.keys import KeyRecord, KeyStoreUnavailable
from cluster.strategy import NOT_ESCALATED, Plan
from cluster.types import GenerationRequest, RouteDecision
from deployments.gateway.edge import key_matches

log = logging.getLogger("ray.serve")
SETTLE_TIMEOUT_S = 2.0
# After a failed Redis call, skip Redis this long: during an outage (a partition that times
# out, not only a refused connection) at most one request a second pays the timeout.
REDIS_BACKOFF_S = 1.0


def env_keys(config: ClusterConfig, env: Mapping[str, str]) -> tuple[str, ...]:
    """The comma-separated keys in ``gateway.api_keys_env`` (none when it is null)."""
    name = config.gateway.api_keys_env
    if name is None:
        return ()
    found = tuple(k.strip() for k in env.get(name, "").split(",") if k.strip())
    if not found:
        # Fail at start: a gateway that meant to require keys must not run open.
        raise ConfigError("no API keys", issues=(("gateway.api_keys_env", f"env var {name} is unset or empty"),))
    return found


def bearer(authorization: str | None) -> str:
    header = authorization or ""
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def _served(d: RouteDecision) -> str:
    return f"{d.model}@{d.version}"  # a pattern may name a version (code@v2) or not (code*)


@dataclasses.dataclass
class Ticket:
    """One admitted request of a limited key: what it reserved, to settle once."""

    record: KeyRecord
    estimate: int
    day: str
    settled: bool = False


class KeyGuard:
    def __init__(
        self,
        config: ClusterConfig,
        env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        store: Any = None,
    ) -> None:
        self.config = config
        self.cfg = config.gateway.keys
        self.env_keys = env_keys(config, env)
        self.clock, self.wall = clock, wall
        self.store = store if store is not None else self._store(env)
        self.cache = keys.VerifiedKeys(self.cfg.cache_ttl_s, self.cfg.stale_ttl_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = float("-inf")

    async def _redis(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """One key-store call, or ``KeyStoreUnavailable`` at once while backing off."""
        if self.clock() < self._down_until:
            raise KeyStoreUnavailable("The key store was unreachable a moment ago; not asking it again yet.")
        try:
            return await call()
        except KeyStoreUnavailable:
            self._down_until = self.clock() + REDIS_BACKOFF_S
            raise

    def _store(self, env: Mapping[str, str]) -> Any:
        if not self.cfg.managed:
            return None
        url = self.config.redis.resolved_url(env)
        if url is None:
            raise ConfigError("managed keys need Redis", issues=(("gateway.keys.managed", "set redis.url (or start with `slmctl up`)"),))
        from cluster.key_store import RedisKeyStore

        r = self.config.redis
        return RedisKeyStore(url, prefix=r.key_prefix, password=r.password(env), timeout_s=r.timeout_s)

    @property
    def required(self) -> bool:
        return bool(self.env_keys) or self.store is not None

    # --- who -----------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> KeyRecord | None:
        """The caller's key record; None for an env-var key or when no key is required
        (unscoped, unlimited). 401 for a missing or wrong key. A managed key verified
        within ``cache_ttl_s`` is not asked of Redis again; while Redis is unreachable,
        one verified within ``stale_ttl_s`` still passes, any other gets a 503."""
        if not self.required:
            return None
        token = bearer(authorization)
        if token and key_matches(token, self.env_keys):
            return None
        if self.store is None or not token:
            raise AuthenticationError("Incorrect or missing API key. Send 'Authorization: Bearer <key>'.")
        digest, now = keys.hash_secret(token), self.clock()
        record = self.cache.fresh(digest, now)
        if record is not None:
            return record
        try:
            record = await self._redis(lambda: self.store.lookup(digest))
        except KeyStoreUnavailable:
            record = self.cache.stale(digest, now)
            if record is None:
                raise
            return record
        self.cache.remember(digest, record, now)
        if record is None:
            raise AuthenticationError("Incorrect API key provided (unknown or revoked).")
        return record

    # --- what --------------------------------------------------------------------------

    @staticmethod
    def check_scope(record: KeyRecord | None, *, model: str, strategy: str, data_class: str) -> None:
        if record is not None:
            keys.check_scope(record, model=model, strategy=strategy, data_class=data_class)

    @staticmethod
    def trim_plan(record: KeyRecord | None, plan: Plan, routed: RouteDecision) -> Plan:
        """The plan without the tiers the key may not reach. The routed model must be in
        scope (403 otherwise); escalations past the scope (cascade's and race's frontier
        tier, auto's escalation straight to the frontier) are dropped, and the routed model
        answers alone, ungated."""
        if record is None:
            return plan
        if not keys.model_allowed(record, _served(routed)):
            raise ModelNotAllowedError(
                f"The API key {record.name!r} may not use model {routed.model!r}, which this request was routed to "
                f"(allowed: {', '.join(record.models)}).", param="model")
        kept = tuple(t for t in plan.tiers if keys.model_allowed(record, _served(t)))
        if kept == plan.tiers:
            return plan
        if not kept or kept[0].deployment_name != routed.deployment_name:
            return dataclasses.replace(plan, tiers=(routed, *kept), escalated=NOT_ESCALATED, frontier_skipped="scope")
        return dataclasses.replace(plan, tiers=kept, frontier_skipped="scope")

    @staticmethod
    def check_admin(record: KeyRecord | None) -> None:
        """403 ``admin_only`` for a managed key without ``--admin`` (``keys.check_admin``)."""
        keys.check_admin(record)

    # --- how much ----------------------------------------------------------------------

    async def admit(self, record: KeyRecord | None, gen: GenerationRequest, headers: dict[str, str]) -> Ticket | None:
        """Reserve one request and the token estimate of a limited key. The rate-limit
        headers go into ``headers`` whether it is admitted or not; a refusal raises 429
        (``rate_limit_exceeded`` or ``insufficient_quota``). While Redis is unreachable,
        ``gateway.keys.*_fail`` decides: open lets the request through uncounted."""
        if record is None or not record.limited:
            return None
        prompt_chars = sum(len(m.content or "") for m in gen.messages)
        estimate = keys.estimate_tokens(prompt_chars, gen.sampling.max_tokens)
        wall = self.wall()
        day = keys.utc_day(wall)
        budget = keys.usd_to_nano(record.usd_per_day) if record.usd_per_day is not None else 0
        try:
            reply = await self._redis(lambda: self.store.admit(record, estimate=estimate, now_ms=int(wall * 1000), day=day,
                                                               budget_nano=budget))
        except KeyStoreUnavailable:
            refusal = keys.when_unreachable(record, self.cfg)
            if refusal is not None:
                headers["retry-after"] = "1"
                raise refusal from None
            log.warning("gateway: key store unreachable; serving key %s without counting its limits", record.name)
            return None
        error, limit_headers = keys.denial(record, reply, wall)
        headers.update(limit_headers)
        if error is not None:
            raise error
        return Ticket(record, estimate, day)

    async def settle(self, ticket: Ticket | None, out: Any = None) -> None:
        """Give back the reservation less what the request used (every call's tokens,
        cancelled ones included) and add its cost to the day's spend; once per ticket.
        Without an outcome (the request failed) nothing was used or billed."""
        if ticket is None or ticket.settled:
            return
        ticket.settled = True
        used, nano = 0, 0
        if out is not None:
            bill = out.bill(self.config)
            used = sum(r.prompt_tokens + r.completion_tokens for r in bill.records)
            nano = keys.usd_to_nano(bill.spent.usd)
        try:
            await asyncio.wait_for(self._redis(lambda: self.store.settle(
                ticket.record, give_back=ticket.estimate - used, nano_usd=nano, now_ms=int(self.wall() * 1000), day=ticket.day)),
                SETTLE_TIMEOUT_S)
        except (KeyStoreUnavailable, TimeoutError):
            log.warning("gateway: could not settle key %s (key store unreachable); its usage is not counted", ticket.record.name)

    def settle_soon(self, ticket: Ticket | None, out: Any = None) -> None:
        """``settle`` as a tracked task, for where awaiting is not possible (a cancelled
        request, the end of a stream); ``close`` waits for them."""
        if ticket is None or ticket.settled:
            return
        task = asyncio.get_running_loop().create_task(self.settle(ticket, out))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled_stream(self, events: AsyncIterator[Any], ticket: Ticket | None, out: Any) -> AsyncIterator[Any]:
        """``events``, settling the ticket when the stream ends, however it ends. The inner
        stream is closed first (not left to the garbage collector), so the model call is
        cancelled at once and its usage is final when the settle reads it."""
        try:
            async for event in events:
                yield event
        finally:
            try:
                await events.aclose()  # type: ignore[attr-defined]
            finally:
                self.settle_soon(ticket, out)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SETTLE_TIMEOUT_S)
        if self.store is not None:
            await self.store.close()
