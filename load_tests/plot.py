"""Capacity plot of a locust run: chat throughput and p95 TTFT against users.

    .venv/bin/python load_tests/plot.py out/run_stats_history.csv [--out out/run_capacity.png] [--slo load_tests/slo.yaml]

Reads locust's ``_stats_history.csv`` written with ``--csv-full-history`` (one row per
entry and second; the percentiles and rates are over locust's sliding ~10 s window). Rows
are grouped by user count: each plateau's first ``--settle`` seconds are dropped (the
window still holds the previous level), and the medians of the rest give one point.
Throughput is the sum of the ``CHAT`` entries' requests per second (answers completed);
p95 TTFT is the ``TTFT all`` entry's (every strategy together; the locustfile fires each
TTFT under its strategy and under ``all``), or, in a file without it, the highest of the
per-strategy p95s (an upper bound). Also prints the table and the capacity: the highest
throughput whose p95 TTFT is inside the SLO.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CHAT, TTFT, ALL = "CHAT", "TTFT", "all"  # as in slo.py (not imported: this file runs alone)


@dataclass(frozen=True)
class Point:
    users: int
    rps: float
    p95_ttft_ms: float | None
    seconds: int


def _num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None  # locust writes N/A before an entry has requests


def seconds(history: str | Path) -> list[tuple[int, int, float, float | None]]:
    """(timestamp, users, chat requests/s, p95 TTFT ms or None) for each second of the run."""
    per_ts: dict[int, dict] = defaultdict(lambda: {"users": 0, "rps": 0.0, "ttft": None, "all": None})
    with open(history, newline="") as f:
        for row in csv.DictReader(f):
            kind = row.get("Type")
            if kind not in (CHAT, TTFT):
                continue
            ts = int(row["Timestamp"])
            slot = per_ts[ts]
            slot["users"] = int(row["User Count"])
            if kind == CHAT:
                slot["rps"] += _num(row["Requests/s"]) or 0.0
            elif (p95 := _num(row.get("95%"))) is not None and (_num(row["Requests/s"]) or 0) > 0:
                if row["Name"] == ALL:
                    slot["all"] = p95
                else:
                    slot["ttft"] = p95 if slot["ttft"] is None else max(slot["ttft"], p95)
    return [(ts, s["users"], s["rps"], s["all"] if s["all"] is not None else s["ttft"]) for ts, s in sorted(per_ts.items())]


def points(history: str | Path, settle_s: int = 12) -> list[Point]:
    """One point per plateau of users (a run that returns to a level gets a point per visit)."""
    out: list[Point] = []
    run: list[tuple[int, int, float, float | None]] = []

    def close() -> None:
        if not run:
            return
        t0 = run[0][0]
        kept = [r for r in run if r[0] - t0 >= settle_s] or run[-1:]
        ttfts = [r[3] for r in kept if r[3] is not None]
        out.append(Point(run[0][1], statistics.median(r[2] for r in kept), statistics.median(ttfts) if ttfts else None, len(run)))

    for row in seconds(history):
        if run and row[1] != run[-1][1]:
            close()
            run = []
        run.append(row)
    close()
    return [p for p in out if p.users > 0]


def capacity(pts: list[Point], slo_ms: float) -> Point | None:
    inside = [p for p in pts if p.p95_ttft_ms is not None and p.p95_ttft_ms <= slo_ms]
    return max(inside, key=lambda p: p.rps) if inside else None


def plot(history: str | Path, out: str | Path, slo_ms: float | None = None, settle_s: int = 12) -> list[Point]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(history, settle_s)
    if not pts:
        raise ValueError(f"no CHAT rows in {history} (run locust with --csv-full-history)")
    users = [p.users for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(users, [p.rps for p in pts], "o-", color="tab:blue", label="chat answers/s")
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("throughput (answers/s)", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(users, [p.p95_ttft_ms if p.p95_ttft_ms is not None else float("nan") for p in pts], "s--", color="tab:red",
             label="p95 TTFT")
    if slo_ms is not None:
        ax2.axhline(slo_ms, color="tab:red", alpha=0.4, linestyle=":", label=f"TTFT SLO {slo_ms:.0f} ms")
    ax2.set_ylabel("p95 TTFT (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    ax.set_title("Gateway capacity: throughput and p95 TTFT against users", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return pts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Capacity plot from a locust _stats_history.csv (--csv-full-history).")
    ap.add_argument("history")
    ap.add_argument("--out", help="PNG path (default: beside the CSV, _capacity.png)")
    ap.add_argument("--slo", default=str(Path(__file__).resolve().parent / "slo.yaml"), help="SLO file for the TTFT line, or 'none'")
    ap.add_argument("--settle", type=int, default=12, help="seconds dropped at the start of each plateau (default 12)")
    args = ap.parse_args(argv)
    out = args.out or args.history.replace("_stats_history.csv", "") + "_capacity.png"
    slo_ms = None
    if args.slo != "none":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from load_tests import slo

        slo_ms = slo.load(args.slo).p95_ttft_ms
    pts = plot(args.history, out, slo_ms, args.settle)
    print(f"{'users':>6} {'answers/s':>10} {'p95 TTFT ms':>12} {'seconds':>8}")
    for p in pts:
        ttft = f"{p.p95_ttft_ms:.0f}" if p.p95_ttft_ms is not None else "-"
        print(f"{p.users:>6} {p.rps:>10.2f} {ttft:>12} {p.seconds:>8}")
    if slo_ms is not None:
        best = capacity(pts, slo_ms)
        print(f"capacity: {best.rps:.2f} answers/s at {best.users} users with p95 TTFT {best.p95_ttft_ms:.0f} ms "
              f"<= {slo_ms:.0f} ms" if best else f"capacity: no plateau had p95 TTFT <= {slo_ms:.0f} ms")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
