"""``slmctl keys create|list|revoke``: managed API keys in the cluster's Redis (docs/api_keys.md).

The Redis is the config's (``redis.url`` / ``redis.url_env``), else the embedded one that
``slmctl up`` started for the local cluster on ``--dashboard-port``. Gateways accept these
keys when the config sets ``gateway.keys.managed``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, Awaitable, Callable

from cluster import keys
from cluster.cli import embedded_redis
from cluster.errors import ConfigError, InvalidRequestError
from cluster.key_store import RedisKeyStore
from cluster.loader import PROFILES, resolve_config


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    k = sub.add_parser("keys", help="create, list and revoke API keys with scopes, rate limits and budgets")
    ksub = k.add_subparsers(dest="keys_command", required=True)

    create = ksub.add_parser("create", help="create a key and print it (once: only its hash is stored)")
    create.add_argument("--name", required=True, help="a unique name for the key (letters, digits, _ . -)")
    create.add_argument("--models", help="comma-separated model patterns it may use, fnmatch style: code*,general,auto (default *)")
    create.add_argument("--strategies", help="comma-separated strategies it may use: route,cascade,race (default *)")
    create.add_argument("--max-data-class", choices=keys.DATA_CLASSES, help="the most sensitive data class it may send (default: any)")
    create.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    create.add_argument("--tpm", type=int, help="tokens per minute, prompt and completion (default: unlimited)")
    create.add_argument("--usd-per-day", type=float, help="USD it may spend per UTC day (default: unlimited)")
    create.add_argument("--admin", action="store_true",
                        help="may also read the operator's endpoints /v1/slm/traffic and /v1/slm/audit (default: no)")
    _source_flags(create)
    create.set_defaults(func=cmd_create)

    lst = ksub.add_parser("list", help="the keys: names, scopes, limits and today's spend (never a secret)")
    lst.add_argument("--json", action="store_true", help="one JSON object per key")
    _source_flags(lst)
    lst.set_defaults(func=cmd_list)

    revoke = ksub.add_parser("revoke", help="delete a key; every gateway refuses it within gateway.keys.cache_ttl_s (1 s)")
    revoke.add_argument("name")
    _source_flags(revoke)
    revoke.set_defaults(func=cmd_revoke)


def _source_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default="local", choices=PROFILES, help="whose redis settings (default: local)")
    src.add_argument("--config", help="a cluster config file, for its redis settings")
    p.add_argument("--dashboard-port", type=int, default=8265, help="the local cluster whose embedded Redis to use (default 8265)")


def _store(args: argparse.Namespace) -> RedisKeyStore:
    cfg = resolve_config(profile=None if args.config else args.profile, path=args.config)
    r = cfg.redis
    url = r.resolved_url(os.environ)
    if url is None:
        found = embedded_redis.running(args.dashboard_port)
        if found is None:
            raise ConfigError("no Redis for the keys", issues=(
                ("redis.url", f"the config names none and no embedded Redis runs for the cluster on --dashboard-port "
                              f"{args.dashboard_port}; start it with `slmctl up` or set redis.url"),))
        url = found.url
    return RedisKeyStore(url, prefix=r.key_prefix, password=r.password(os.environ), timeout_s=max(r.timeout_s, 2.0))


def _run(args: argparse.Namespace, work: Callable[[RedisKeyStore], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        store = _store(args)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def cmd_create(args: argparse.Namespace) -> int:
    secret = keys.new_secret()
    digest = keys.hash_secret(secret)
    record = keys.make_record(
        args.name, models=args.models, strategies=args.strategies, max_data_class=args.max_data_class,
        rpm=args.rpm, tpm=args.tpm, usd_per_day=args.usd_per_day, created=time.time(), key_id=digest[:16], admin=args.admin,
    )
    if not _run(args, lambda s: s.create(record, digest)):
        raise InvalidRequestError(f"a key named {args.name!r} exists; revoke it first or pick another name", param="--name")
    print(secret)
    print(f"created key {record.name!r} (id {record.key_id}): {_limits(record)}. "
          "This is the only time the key is shown; only its SHA-256 is stored.", file=sys.stderr)
    return 0


def _limits(r: keys.KeyRecord) -> str:
    def some(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v:g}{unit}" if isinstance(v, float) else f"{v}{unit}"

    return (f"models {','.join(r.models)}; strategies {','.join(r.strategies)}; data up to {r.max_data_class or 'any'}; "
            f"rpm {some(r.rpm)}; tpm {some(r.tpm)}; usd/day {some(r.usd_per_day)}{'; admin' if r.admin else ''}")


def cmd_list(args: argparse.Namespace) -> int:
    day = keys.utc_day(time.time())

    async def work(store: RedisKeyStore) -> list[tuple[keys.KeyRecord, int]]:
        return [(r, await store.spent_nano(r.name, day)) for r in await store.records()]

    rows = _run(args, work)
    if args.json:
        for record, spent in rows:
            print(json.dumps({**json.loads(record.to_json()), "spent_usd_today": spent / keys.NANO}, sort_keys=True))
        return 0
    if not rows:
        print("no managed keys (create one with `slmctl keys create --name NAME`)")
        return 0
    print(f"{'NAME':<20} {'ID':<16}  {'SPENT TODAY':>12}  LIMITS")
    for record, spent in rows:
        print(f"{record.name:<20} {record.key_id:<16}  {'$' + format(spent / keys.NANO, '.6f'):>12}  {_limits(record)}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if not _run(args, lambda s: s.revoke(args.name)):
        print(f"no key named {args.name!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.name!r}; gateways refuse it within a second")
    return 0
