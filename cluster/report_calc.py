"""``slmctl report``'s arithmetic over audit lines (``cluster.audit``): pure, no I/O.

Totals are plain sums of the lines' own figures, so a report always agrees with the lines
it read: cost and energy of every call (cancelled ones included), against the frontier-only
counterfactual of each line that has one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

NONE = "(none)"  # the model of a request refused before any route (auth, bad body)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _share(n: int, of: int) -> float:
    return n / of if of else 0.0


def _model_of(rec: dict[str, Any]) -> tuple[str, str]:
    route = rec.get("route") or {}
    return route.get("model") or NONE, route.get("version") or NONE


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Requests and share per model and version, escalation and race-win rates, p50/p95
    latency and TTFT per model, and cost and energy against frontier-only."""
    recs = list(records)
    n = len(recs)
    per_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in recs:
        per_model[_model_of(rec)[0]].append(rec)
    models: dict[str, Any] = {}
    for model, rs in sorted(per_model.items()):
        versions: dict[str, int] = defaultdict(int)
        for rec in rs:
            versions[_model_of(rec)[1]] += 1
        lat = [float(r["latency_ms"]) for r in rs if r.get("latency_ms") is not None]
        ttft = [float(r["ttft_ms"]) for r in rs if r.get("ttft_ms") is not None]
        models[model] = {
            "requests": len(rs),
            "share": _share(len(rs), n),
            "versions": {v: {"requests": c, "share": _share(c, n)} for v, c in sorted(versions.items())},
            "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95)},
            "ttft_ms": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
        }
    escalatable = [r for r in recs if r.get("escalated") is not None]
    escalated = sum(1 for r in escalatable if r.get("escalated") == "true")
    races = [r for r in recs if r.get("race_winner") is not None]
    small_wins = sum(1 for r in races if r.get("race_winner") == "small")
    cost = sum(float(r.get("cost_usd") or 0) for r in recs)
    energy = sum(float(r.get("energy_j") or 0) for r in recs)
    # Every call's completion tokens, cancelled calls included, as the energy counts them.
    tokens = sum(int(c.get("completion_tokens") or 0) for r in recs for c in (r.get("calls") or ()))
    frontier = sum(float(r["frontier_cost_usd"]) for r in recs if r.get("frontier_cost_usd") is not None)
    status: dict[str, int] = defaultdict(int)
    for rec in recs:
        status[str(rec.get("status"))] += 1
    times = [float(r["time"]) for r in recs if r.get("time") is not None]
    return {
        "requests": n,
        "from": min(times) if times else None,
        "to": max(times) if times else None,
        "status": dict(sorted(status.items())),
        "errors": sum(1 for r in recs if int(r.get("status") or 0) >= 400 or r.get("error_code")),
        "models": models,
        "escalation": {"requests": len(escalatable), "escalated": escalated, "rate": _share(escalated, len(escalatable))},
        "race": {"requests": len(races), "small_wins": small_wins, "win_rate": _share(small_wins, len(races))},
        "cost_usd": cost,
        "energy_j": energy,
        "completion_tokens": tokens,
        "energy_j_per_token": energy / tokens if tokens else None,
        "frontier_cost_usd": frontier,
        "saving_usd": frontier - cost,
        "saving_pct": (frontier - cost) / frontier * 100 if frontier > 0 else None,
    }


def buckets(records: Iterable[dict[str, Any]], width_s: float) -> list[dict[str, Any]]:
    """Per time bucket (for the plot): requests per model, and cost and frontier cost."""
    out: dict[int, dict[str, Any]] = {}
    for rec in records:
        t = rec.get("time")
        if t is None:
            continue
        key = int(float(t) // width_s)
        b = out.setdefault(key, {"start": key * width_s, "models": defaultdict(int), "cost_usd": 0.0, "frontier_cost_usd": 0.0})
        b["models"][_model_of(rec)[0]] += 1
        b["cost_usd"] += float(rec.get("cost_usd") or 0)
        b["frontier_cost_usd"] += float(rec.get("frontier_cost_usd") or 0)
    return [{**b, "models": dict(b["models"])} for _, b in sorted(out.items())]


def format_text(s: dict[str, Any]) -> str:
    """The human report."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [f"requests: {s['requests']}  errors: {s['errors']}  status: " + ", ".join(f"{k}={v}" for k, v in s["status"].items())]
    lines.append("")
    lines.append(f"{'MODEL':<22} {'REQUESTS':>8} {'SHARE':>7} {'P50 MS':>8} {'P95 MS':>8} {'P50 TTFT':>9} {'P95 TTFT':>9}")
    for model, m in s["models"].items():
        lines.append(f"{model:<22} {m['requests']:>8} {m['share']:>7.1%} {ms(m['latency_ms']['p50']):>8} {ms(m['latency_ms']['p95']):>8} "
                     f"{ms(m['ttft_ms']['p50']):>9} {ms(m['ttft_ms']['p95']):>9}")
        for version, v in (m["versions"].items() if model != NONE else ()):
            lines.append(f"  @{version:<19} {v['requests']:>8} {v['share']:>7.1%}")
    esc, race = s["escalation"], s["race"]
    lines.append("")
    lines.append(f"escalation rate: {esc['rate']:.1%} ({esc['escalated']} of {esc['requests']})")
    lines.append(f"race win rate (small model): {race['win_rate']:.1%} ({race['small_wins']} of {race['requests']} races)")
    saving = "-" if s["saving_pct"] is None else f"{s['saving_pct']:.1f}%"
    lines.append(f"cost: ${s['cost_usd']:.6f}  energy: {s['energy_j']:.1f} J  frontier-only: ${s['frontier_cost_usd']:.6f}  saving: {saving}")
    per_token = "-" if s["energy_j_per_token"] is None else f"{s['energy_j_per_token']:.3f} J"
    lines.append(f"completion tokens: {s['completion_tokens']} (every call, cancelled ones included)  energy per token: {per_token}")
    return "\n".join(lines)
