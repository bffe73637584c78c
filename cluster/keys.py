"""Managed API keys: the key model, hashing, scope matching and the limit decisions.

Pure: no Redis, no clock of its own. ``cluster/key_store.py`` keeps the records and the
counters in Redis (the Lua scripts there do the atomic counting); the gateway
(``deployments/gateway/auth.py``) asks this module what the answers mean: which error,
which ``x-ratelimit-*`` headers, what to do while Redis is unreachable. docs/api_keys.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import hashlib
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

from cluster.config import DATA_CLASSES, STRATEGIES
from cluster.config_keys import KeysConfig
from cluster.errors import (
    AdminOnlyError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotAllowedError,
    QuotaExceededError,
    RateLimitExceededError,
    SLMError,
)

SECRET_PREFIX = "slm-"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NANO = 1_000_000_000  # budgets are counted in integer nano-USD, so Redis adds them exactly
DAY_S = 86_400


class KeyStoreUnavailable(EngineUnavailableError):
    """Redis, which holds the keys and the counters, cannot be reached; a limit configured to
    fail closed refuses the request (503: retry once it is back)."""

    default_code = "key_store_unavailable"


# --- the key ---------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh key: ``slm-`` and 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of the key, the only form it is stored in. Any string hashes (a
    non-ASCII token is simply a wrong key). Its first 16 digits are the audit line's
    ``api_key_hash``."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """What Redis holds for one key (never the secret). ``None`` limits are unlimited."""

    name: str
    models: tuple[str, ...] = ("*",)
    strategies: tuple[str, ...] = ("*",)
    max_data_class: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    usd_per_day: float | None = None
    created: float = 0.0  # unix seconds
    key_id: str = ""  # the first 16 hex digits of the hash, to match audit lines
    admin: bool = False  # may read the operator's endpoints (/v1/slm/*); records stored before it existed are not

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.usd_per_day is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> "KeyRecord":
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**data)


def split_list(text: str | None) -> tuple[str, ...]:
    """``"code*, general"`` -> ``("code*", "general")``; empty or None -> ``("*",)``."""
    items = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    return items or ("*",)


def make_record(
    name: str,
    *,
    models: str | None = None,
    strategies: str | None = None,
    max_data_class: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    usd_per_day: float | None = None,
    created: float = 0.0,
    key_id: str = "",
    admin: bool = False,
) -> KeyRecord:
    """A validated record (400 ``InvalidRequestError`` naming the bad flag)."""
    if not NAME.fullmatch(name):
        raise InvalidRequestError(f"key name {name!r}: use 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)", param="--name")
    strats = split_list(strategies)
    unknown = [s for s in strats if s != "*" and s not in STRATEGIES]
    if unknown:
        raise InvalidRequestError(f"unknown strategies {unknown}; use {list(STRATEGIES)} or *", param="--strategies")
    if max_data_class is not None and max_data_class not in DATA_CLASSES:
        raise InvalidRequestError(f"unknown data class {max_data_class!r}; use one of {list(DATA_CLASSES)}", param="--max-data-class")
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and value < 1:
            raise InvalidRequestError(f"{flag} must be at least 1, got {value}", param=flag)
    if usd_per_day is not None and not (usd_per_day > 0 and math.isfinite(usd_per_day)):
        raise InvalidRequestError(f"--usd-per-day must be a positive number, got {usd_per_day}", param="--usd-per-day")
    return KeyRecord(name, split_list(models), strats, max_data_class, rpm, tpm, usd_per_day, created, key_id, admin)


# --- scope ---------------------------------------------------------------------------


def model_allowed(record: KeyRecord, model: str) -> bool:
    """``model`` as the client names it (``code``, ``code@v2``, ``auto``): a pattern
    (fnmatch, case-sensitive) must match the whole name or the name before ``@``."""
    base = model.split("@", 1)[0]
    return any(fnmatch.fnmatchcase(model, p) or fnmatch.fnmatchcase(base, p) for p in record.models)


def strategy_allowed(record: KeyRecord, strategy: str) -> bool:
    return any(fnmatch.fnmatchcase(strategy, p) for p in record.strategies)


def data_class_allowed(record: KeyRecord, data_class: str) -> bool:
    """Classes are ordered public < internal < restricted; a key may send up to its maximum."""
    if record.max_data_class is None:
        return True
    return DATA_CLASSES.index(data_class) <= DATA_CLASSES.index(record.max_data_class)


def check_scope(record: KeyRecord, *, model: str, strategy: str, data_class: str) -> None:
    """403 ``model_not_allowed`` when the request reaches past the key's scope."""
    if not model_allowed(record, model):
        raise ModelNotAllowedError(f"The API key {record.name!r} may not use model {model!r} (allowed: {', '.join(record.models)}).",
                                   param="model")
    if not strategy_allowed(record, strategy):
        raise ModelNotAllowedError(
            f"The API key {record.name!r} may not use strategy {strategy!r} (allowed: {', '.join(record.strategies)}).")
    if not data_class_allowed(record, data_class):
        raise ModelNotAllowedError(
            f"The API key {record.name!r} may send data up to {record.max_data_class!r}; this request is {data_class!r}.")


def check_admin(record: KeyRecord | None) -> None:
    """403 ``admin_only`` unless the caller may read the operator's endpoints: an env-var
    key (or an open API), both ``None`` here, or a managed key created with ``--admin``.
    A managed key's scope is about models; what the cluster is doing (traffic splits,
    audit sinks) is the operator's, so an ordinary key must not see it."""
    if record is not None and not record.admin:
        raise AdminOnlyError(f"The API key {record.name!r} may not read this endpoint: it is for the operator's keys "
                             "(the env-var keys, or a key created with `slmctl keys create --admin`).")


# --- limits ----------------------------------------------------------------------------


def estimate_tokens(prompt_chars: int, max_tokens: int) -> int:
    """What a request reserves before its call: about 4 characters a token for the prompt,
    plus every token it may generate. Settled against the real usage afterwards."""
    return math.ceil(prompt_chars / 4) + max_tokens


def utc_day(wall_s: float) -> str:
    return dt.datetime.fromtimestamp(wall_s, dt.timezone.utc).strftime("%Y-%m-%d")


def seconds_to_utc_midnight(wall_s: float) -> float:
    return DAY_S - (wall_s % DAY_S)


def usd_to_nano(usd: float) -> int:
    return max(0, round(usd * NANO))


@dataclass(frozen=True)
class LimitReply:
    """The admit script's answer. ``reason``: "" (admitted), "rpm", "tpm" or "quota".
    Remaining counts are after this request's reservation; ``-1`` means not limited."""

    allowed: bool
    reason: str
    requests_remaining: int
    requests_reset_ms: int
    tokens_remaining: int
    tokens_reset_ms: int
    retry_after_ms: int
    spent_nano: int

    @classmethod
    def from_lua(cls, raw: Sequence[Any]) -> "LimitReply":
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        a, reason, rr, rreset, tr, treset, retry, spent = raw
        return cls(int(a) == 1, text(reason), int(rr), int(rreset), int(tr), int(treset), int(retry), int(text(spent)))


def format_reset(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:g}s"
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}m{rest / 1000:g}s"


def rate_headers(record: KeyRecord, reply: LimitReply) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits this key has (none for the others)."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset in (
        ("requests", record.rpm, reply.requests_remaining, reply.requests_reset_ms),
        ("tokens", record.tpm, reply.tokens_remaining, reply.tokens_reset_ms),
    ):
        if limit is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{kind}"] = format_reset(reset)
    return headers


def retry_after_s(ms: int) -> str:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(ms / 1000)))


def denial(record: KeyRecord, reply: LimitReply, wall_s: float) -> tuple[SLMError | None, dict[str, str]]:
    """(the error for a refused request or None, the headers to send either way)."""
    headers = rate_headers(record, reply)
    if reply.allowed:
        return None, headers
    if reply.reason == "quota":
        headers["retry-after"] = retry_after_s(int(seconds_to_utc_midnight(wall_s) * 1000))
        spent = reply.spent_nano / NANO
        return QuotaExceededError(
            f"The API key {record.name!r} has spent ${spent:.6f} of its ${record.usd_per_day:g} for today (UTC); it resets at midnight UTC."
        ), headers
    what = "requests" if reply.reason == "rpm" else "tokens"
    limit = record.rpm if reply.reason == "rpm" else record.tpm
    headers["retry-after"] = retry_after_s(reply.retry_after_ms)
    return RateLimitExceededError(
        f"Rate limit reached for API key {record.name!r}: {limit} {what} per minute. Retry in {format_reset(reply.retry_after_ms)}."
    ), headers


def when_unreachable(record: KeyRecord, cfg: KeysConfig) -> SLMError | None:
    """While Redis is unreachable no limit can be counted: a limit this key has that the
    config fails closed refuses the request; open ones let it through uncounted."""
    if record.usd_per_day is not None and cfg.budgets_fail == "closed":
        return KeyStoreUnavailable("Budgets cannot be checked now (the key store is unreachable); retry shortly.")
    if (record.rpm is not None or record.tpm is not None) and cfg.rate_limits_fail == "closed":
        return KeyStoreUnavailable("Rate limits cannot be checked now (the key store is unreachable); retry shortly.")
    return None


# --- the gateway's cache of verified keys -------------------------------------------------


class VerifiedKeys:
    """Keys this gateway verified in Redis, and when. ``fresh`` entries (younger than
    ``cache_ttl_s``) skip Redis, so a revocation takes at most that long; while Redis is
    unreachable, entries younger than ``stale_ttl_s`` still authenticate. A key found
    missing is forgotten at once. Times come from the caller's clock."""

    def __init__(self, cache_ttl_s: float, stale_ttl_s: float, max_entries: int = 10_000) -> None:
        self.cache_ttl_s, self.stale_ttl_s, self.max_entries = cache_ttl_s, stale_ttl_s, max_entries
        self._seen: dict[str, tuple[KeyRecord, float]] = {}

    def fresh(self, digest: str, now: float) -> KeyRecord | None:
        return self._within(digest, now, self.cache_ttl_s)

    def stale(self, digest: str, now: float) -> KeyRecord | None:
        return self._within(digest, now, self.stale_ttl_s)

    def _within(self, digest: str, now: float, ttl: float) -> KeyRecord | None:
        hit = self._seen.get(digest)
        return hit[0] if hit is not None and 0 <= now - hit[1] < ttl else None

    def remember(self, digest: str, record: KeyRecord | None, now: float) -> None:
        if record is None:
            self._seen.pop(digest, None)
            return
        if len(self._seen) >= self.max_entries and digest not in self._seen:
            # bounded: wrong keys are never cached, so this only trims old good ones
            oldest = min(self._seen, key=lambda d: self._seen[d][1])
            del self._seen[oldest]
        self._seen[digest] = (record, now)
