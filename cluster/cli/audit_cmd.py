"""``slmctl audit tail|query`` and ``slmctl report``: read the gateway's audit trail.

They read the JSONL file (and its rotated backups) that ``audit.path`` names, on the
machine where the gateway runs; nothing here talks to Ray. docs/observability.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from typing import Any, Iterable

from cluster import audit, report_calc
from cluster.errors import InvalidRequestError
from cluster.loader import PROFILES, resolve_config


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", help="the audit file (default: the config's audit.path)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default="local", choices=PROFILES, help="whose audit.path (default: local)")
    src.add_argument("--config", help="a cluster config file, for its audit.path")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    a = sub.add_parser("audit", help="read the per-request audit trail (one JSON line per request)")
    asub = a.add_subparsers(dest="audit_command", required=True)
    tail = asub.add_parser("tail", help="the last audit lines")
    tail.add_argument("-n", type=int, default=10, help="how many lines (default 10)")
    _source_flags(tail)
    tail.set_defaults(func=cmd_tail)
    query = asub.add_parser("query", help="audit lines that match filters")
    query.add_argument("--since", help="only lines newer than this (30s, 10m, 1h, 7d)")
    query.add_argument("--model", help="the answering model: code, or code@v2")
    query.add_argument("--status", help="an HTTP status (429) or a class (4xx, 5xx)")
    query.add_argument("--json", action="store_true", help="print the matching lines as JSON lines")
    _source_flags(query)
    query.set_defaults(func=cmd_query)

    r = sub.add_parser("report", help="requests, model mix, escalation and race rates, latency, cost and energy vs frontier-only")
    r.add_argument("--since", default="1h", help="the window to report on (default 1h; 'all' for the whole trail)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--plot", help="also draw the model mix and cost over time into this PNG (needs matplotlib)")
    _source_flags(r)
    r.set_defaults(func=cmd_report)


def _path(args: argparse.Namespace) -> str:
    if args.path:
        return args.path
    cfg = resolve_config(profile=None if args.config else args.profile, path=args.config)
    return cfg.audit.path


def _since(text: str | None) -> float | None:
    if text is None or text.strip().lower() == "all":
        return None
    return time.time() - audit.parse_duration(text)


def _short(rec: dict[str, Any]) -> str:
    route = rec.get("route") or {}
    served = f"{route.get('model')}@{route.get('version')}" if route else "-"
    calls = ",".join(f"{c.get('deployment')}:{c.get('outcome')}" for c in rec.get("calls") or [])
    err = f" {rec['error_code']}" if rec.get("error_code") else ""
    return (f"{rec.get('ts')} {rec.get('status')}{err} {rec.get('request_id')} {rec.get('strategy') or '-'} -> {served} "
            f"({route.get('reason', '-') if route else '-'}) {float(rec.get('latency_ms') or 0):.0f}ms "
            f"${float(rec.get('cost_usd') or 0):.6f} [{calls}]")


def _print(records: Iterable[dict[str, Any]], as_json: bool) -> None:
    for rec in records:
        print(audit.dumps(rec) if as_json else _short(rec))


def cmd_tail(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InvalidRequestError(f"-n must be at least 1, got {args.n}")
    _print(deque(audit.read_records(_path(args)), maxlen=args.n), as_json=True)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    found = (r for r in audit.read_records(_path(args), since=_since(args.since)) if audit.matches(r, model=args.model, status=args.status))
    _print(found, args.json)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    records = list(audit.read_records(_path(args), since=_since(args.since)))
    summary = report_calc.summarize(records)
    if args.plot:
        plot(records, args.plot)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(report_calc.format_text(summary))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Model mix (stacked requests per bucket) and cost against frontier-only over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidRequestError("--plot needs matplotlib: pip install matplotlib (or the dev extra)") from None
    times = [float(r["time"]) for r in records if r.get("time") is not None]
    span = (max(times) - min(times)) if times else 0.0
    width = max(1.0, span / 40)  # about 40 buckets
    bs = report_calc.buckets(records, width)
    models = sorted({m for b in bs for m in b["models"]})
    t0 = bs[0]["start"] if bs else 0.0
    x = [b["start"] - t0 for b in bs]
    fig, (mix, cost) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    bottom = [0] * len(bs)
    for m in models:
        ys = [b["models"].get(m, 0) for b in bs]
        mix.bar(x, ys, width=width * 0.9, bottom=bottom, align="edge", label=m)
        bottom = [a + y for a, y in zip(bottom, ys)]
    mix.set_ylabel(f"requests per {width:g} s")
    mix.set_title("model mix")
    mix.legend(loc="upper right", fontsize="small")
    run_cost, run_frontier, c, f = [], [], 0.0, 0.0
    for b in bs:
        c, f = c + b["cost_usd"], f + b["frontier_cost_usd"]
        run_cost.append(c)
        run_frontier.append(f)
    cost.step(x, run_cost, where="post", label="ensemble")
    cost.step(x, run_frontier, where="post", label="frontier only")
    cost.set_ylabel("cumulative cost (USD)")
    cost.set_xlabel("seconds since the first request")
    cost.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
