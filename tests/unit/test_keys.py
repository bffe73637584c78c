"""The pure side of managed API keys (cluster/keys.py): scope matching, the limit decision,
the x-ratelimit-* headers, the fail modes and the gateway's cache of verified keys."""

from __future__ import annotations

import hashlib
import json

import pytest

from cluster import keys
from cluster.config_keys import KeysConfig
from cluster.errors import AdminOnlyError, InvalidRequestError, ModelNotAllowedError, QuotaExceededError, RateLimitExceededError
from cluster.keys import KeyRecord, LimitReply
from cluster.strategy import Plan
from cluster.types import RouteDecision
from deployments.gateway.auth import KeyGuard


def test_secrets_are_random_and_only_their_hash_is_kept() -> None:
    a, b = keys.new_secret(), keys.new_secret()
    assert a != b and a.startswith("slm-") and len(a) >= 40
    assert keys.hash_secret(a) == hashlib.sha256(a.encode()).hexdigest()
    record = keys.make_record("ci", key_id=keys.hash_secret(a)[:16])
    assert a not in record.to_json() and keys.hash_secret(a) not in record.to_json()
    assert keys.hash_secret("é\udcff")  # any token hashes; a non-ASCII one is just wrong


def test_a_record_round_trips_through_json() -> None:
    r = keys.make_record("team-a", models="code*, general", strategies="route", max_data_class="internal",
                         rpm=10, tpm=1000, usd_per_day=2.5, created=1.0, key_id="ab")
    assert KeyRecord.from_json(r.to_json()) == r
    assert r.models == ("code*", "general") and r.limited
    assert not keys.make_record("open").limited


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": "bad name"}, "--name"),
        ({"name": ""}, "--name"),
        ({"name": "a", "strategies": "route,yolo"}, "--strategies"),
        ({"name": "a", "max_data_class": "secret"}, "--max-data-class"),
        ({"name": "a", "rpm": 0}, "--rpm"),
        ({"name": "a", "tpm": -5}, "--tpm"),
        ({"name": "a", "usd_per_day": 0.0}, "--usd-per-day"),
        ({"name": "a", "usd_per_day": float("inf")}, "--usd-per-day"),
    ],
)
def test_bad_records_name_the_flag(kwargs: dict, param: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(InvalidRequestError) as err:
        keys.make_record(name, **kwargs)
    assert err.value.param == param


@pytest.mark.parametrize(
    ("patterns", "model", "ok"),
    [
        ("*", "anything", True),
        ("code*", "code", True),
        ("code*", "code@v2", True),
        ("code*", "codex", True),
        ("code*", "general", False),
        ("general", "general@v1", True),
        ("general", "generalist", False),
        ("code*,general", "general", True),
        ("code*,general", "auto", False),
        ("auto", "auto", True),
        ("code@v1", "code@v2", False),
        ("Code", "code", False),  # case-sensitive, as model names are
    ],
)
def test_model_patterns(patterns: str, model: str, ok: bool) -> None:
    assert keys.model_allowed(keys.make_record("k", models=patterns), model) is ok


@pytest.mark.parametrize(
    ("max_class", "data_class", "ok"),
    [
        (None, "restricted", True),
        ("public", "public", True),
        ("public", "internal", False),
        ("internal", "internal", True),
        ("internal", "restricted", False),
        ("restricted", "restricted", True),
    ],
)
def test_data_class_ordering(max_class: str | None, data_class: str, ok: bool) -> None:
    assert keys.data_class_allowed(keys.make_record("k", max_data_class=max_class), data_class) is ok


@pytest.mark.parametrize(
    ("scope", "asked", "fails"),
    [
        ({}, {"model": "frontier", "strategy": "race", "data_class": "restricted"}, False),
        ({"models": "code*"}, {"model": "general", "strategy": "route", "data_class": "public"}, True),
        ({"strategies": "route"}, {"model": "code", "strategy": "cascade", "data_class": "public"}, True),
        ({"strategies": "route,cascade"}, {"model": "code", "strategy": "cascade", "data_class": "public"}, False),
        ({"max_data_class": "public"}, {"model": "code", "strategy": "route", "data_class": "internal"}, True),
    ],
)
def test_check_scope_is_a_403_model_not_allowed(scope: dict, asked: dict, fails: bool) -> None:
    record = keys.make_record("k", **scope)
    if not fails:
        keys.check_scope(record, **asked)
        return
    with pytest.raises(ModelNotAllowedError) as err:
        keys.check_scope(record, **asked)
    assert err.value.http_status == 403 and err.value.code == "model_not_allowed"


@pytest.mark.parametrize(("chars", "max_tokens", "expected"), [(0, 16, 16), (1, 16, 17), (4, 16, 17), (5, 16, 18), (400, 0, 100)])
def test_token_estimate(chars: int, max_tokens: int, expected: int) -> None:
    assert keys.estimate_tokens(chars, max_tokens) == expected


@pytest.mark.parametrize(("ms", "text"), [(0, "0ms"), (-5, "0ms"), (20, "20ms"), (1000, "1s"), (1500, "1.5s"), (60_000, "1m0s"),
                                          (360_000, "6m0s"), (61_500, "1m1.5s")])
def test_reset_format_is_openais(ms: int, text: str) -> None:
    assert keys.format_reset(ms) == text


def reply(allowed: bool = True, reason: str = "", rr: int = 9, rreset: int = 6000, tr: int = 900, treset: int = 6000,
          retry: int = 0, spent: int = 0) -> LimitReply:
    return LimitReply(allowed, reason, rr, rreset, tr, treset, retry, spent)


def test_headers_only_for_the_limits_a_key_has() -> None:
    both = keys.make_record("k", rpm=10, tpm=1000)
    assert keys.rate_headers(both, reply()) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s",
    }
    assert set(keys.rate_headers(keys.make_record("k", rpm=10), reply())) == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
    assert keys.rate_headers(keys.make_record("k", usd_per_day=1.0), reply()) == {}
    # a token bucket in debt (real usage above the estimate) never shows a negative remainder
    assert keys.rate_headers(keys.make_record("k", tpm=100), reply(tr=-40))["x-ratelimit-remaining-tokens"] == "0"


WALL = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.mark.parametrize(
    ("r", "error", "code", "retry_after"),
    [
        (reply(), None, None, None),
        (reply(False, "rpm", rr=0, retry=1500), RateLimitExceededError, "rate_limit_exceeded", "2"),
        (reply(False, "tpm", tr=3, retry=200), RateLimitExceededError, "rate_limit_exceeded", "1"),
        (reply(False, "quota", spent=2_000_000_000), QuotaExceededError, "insufficient_quota", str(86_400 - 80_000)),
    ],
)
def test_denial(r: LimitReply, error: type | None, code: str | None, retry_after: str | None) -> None:
    record = keys.make_record("k", rpm=10, tpm=1000, usd_per_day=2.0)
    err, headers = keys.denial(record, r, WALL)
    assert headers["x-ratelimit-limit-requests"] == "10"
    if error is None:
        assert err is None and "retry-after" not in headers
        return
    assert isinstance(err, error) and err.http_status == 429 and err.code == code
    assert headers["retry-after"] == retry_after
    assert err.to_openai()["error"]["type"] == ("insufficient_quota" if code == "insufficient_quota" else "rate_limit_error")


def test_utc_day_and_midnight() -> None:
    assert keys.utc_day(WALL) == "2023-11-14"
    assert keys.seconds_to_utc_midnight(WALL) == 86_400 - 80_000
    assert keys.usd_to_nano(0.000002) == 2000 and keys.usd_to_nano(-1.0) == 0


@pytest.mark.parametrize(
    ("limits", "rate_mode", "budget_mode", "refused"),
    [
        ({"rpm": 5}, "open", "closed", False),  # the defaults: rate limits open
        ({"rpm": 5}, "closed", "closed", True),
        ({"tpm": 5}, "closed", "open", True),
        ({"usd_per_day": 1.0}, "open", "closed", True),  # the defaults: budgets closed
        ({"usd_per_day": 1.0}, "open", "open", False),
        ({"rpm": 5, "usd_per_day": 1.0}, "open", "closed", True),
        ({}, "closed", "closed", False),  # an unlimited key has nothing to count
    ],
)
def test_when_redis_is_unreachable(limits: dict, rate_mode: str, budget_mode: str, refused: bool) -> None:
    cfg = KeysConfig(rate_limits_fail=rate_mode, budgets_fail=budget_mode)
    err = keys.when_unreachable(keys.make_record("k", **limits), cfg)
    assert (err is not None) is refused
    if err is not None:
        assert err.http_status == 503 and err.code == "key_store_unavailable" and err.retryable


@pytest.mark.parametrize(
    ("record", "allowed"),
    [
        (None, True),  # an env-var key, or an API without keys
        (keys.make_record("ops", admin=True), True),
        (keys.make_record("ops-limited", admin=True, rpm=5, models="code*"), True),  # admin is not about models
        (keys.make_record("team", models="*"), False),  # an unscoped managed key is still not the operator
        (keys.make_record("team-limited", rpm=5), False),
    ],
)
def test_only_env_keys_and_admin_keys_read_the_operators_endpoints(record: KeyRecord | None, allowed: bool) -> None:
    if allowed:
        KeyGuard.check_admin(record)
        return
    with pytest.raises(AdminOnlyError) as err:
        KeyGuard.check_admin(record)
    body = err.value.to_openai()["error"]
    assert err.value.http_status == 403 and body["code"] == "admin_only" and body["type"] == "permission_error"
    assert record is not None and record.name in body["message"]


def test_admin_round_trips_and_records_stored_before_it_are_not_admin() -> None:
    admin = keys.make_record("ops", admin=True, key_id="ab")
    assert KeyRecord.from_json(admin.to_json()).admin
    old = {k: v for k, v in json.loads(keys.make_record("old").to_json()).items() if k != "admin"}
    assert not KeyRecord.from_json(json.dumps(old)).admin


def test_the_defaults_are_closed_for_budgets_and_open_for_rate_limits() -> None:
    cfg = KeysConfig()
    assert (cfg.budgets_fail, cfg.rate_limits_fail, cfg.managed, cfg.cache_ttl_s) == ("closed", "open", False, 0.5)


def test_verified_keys_fresh_stale_and_forgotten() -> None:
    cache = keys.VerifiedKeys(cache_ttl_s=1.0, stale_ttl_s=300.0, max_entries=2)
    r = keys.make_record("k")
    cache.remember("h1", r, now=100.0)
    assert cache.fresh("h1", 100.5) == r and cache.fresh("h1", 101.0) is None  # revocation seen within a second
    assert cache.stale("h1", 399.0) == r and cache.stale("h1", 400.0) is None
    assert cache.fresh("h1", 99.0) is None  # a clock gone backwards trusts nothing
    cache.remember("h1", None, now=100.2)  # found missing (revoked): forgotten at once
    assert cache.stale("h1", 100.3) is None
    for i, now in enumerate((1.0, 2.0, 3.0)):
        cache.remember(f"k{i}", r, now)
    assert cache.stale("k0", 3.0) is None and cache.stale("k2", 3.0) == r  # bounded: the oldest goes


def _d(model: str, version: str = "v1") -> RouteDecision:
    return RouteDecision(model=model, version=version, reason="test")


CODE, CODE2, GENERAL, FRONTIER = _d("code"), _d("code", "v2"), _d("general"), _d("frontier")


@pytest.mark.parametrize(
    ("patterns", "plan", "routed", "tiers", "escalated"),
    [
        (None, Plan("cascade", (CODE, FRONTIER)), CODE, (CODE, FRONTIER), "false"),  # env keys: unscoped
        ("*", Plan("race", (CODE, FRONTIER)), CODE, (CODE, FRONTIER), "false"),
        ("code*", Plan("cascade", (CODE, GENERAL, FRONTIER)), CODE, (CODE,), "false"),
        ("code*,general", Plan("cascade", (CODE, GENERAL, FRONTIER)), CODE, (CODE, GENERAL), "false"),
        ("code*", Plan("race", (CODE, FRONTIER)), CODE, (CODE,), "false"),
        # auto escalated straight to the frontier: the routed model answers instead
        ("code*", Plan("route", (FRONTIER,), escalated="true"), CODE, (CODE,), "false"),
        ("code@v2", Plan("route", (CODE2,)), CODE2, (CODE2,), "false"),
        ("code*", Plan("route", (GENERAL,)), GENERAL, None, None),  # routed out of scope: 403
        ("code@v2", Plan("route", (CODE,)), CODE, None, None),  # a pinned version is not another one
    ],
)
def test_trim_plan(patterns: str | None, plan: Plan, routed: RouteDecision, tiers: tuple | None, escalated: str | None) -> None:
    record = None if patterns is None else keys.make_record("k", models=patterns)
    if tiers is None:
        with pytest.raises(ModelNotAllowedError):
            KeyGuard.trim_plan(record, plan, routed)
        return
    trimmed = KeyGuard.trim_plan(record, plan, routed)
    assert trimmed.tiers == tiers and trimmed.escalated == escalated and trimmed.strategy == plan.strategy
    assert trimmed.frontier_skipped == (None if tiers == plan.tiers else "scope")
