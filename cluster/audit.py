"""The audit line: one JSON object per chat request, and reading them back.

The gateway builds each line with ``build_record`` from the same values its response
headers report (the route decision, the strategy's ``Outcome``, ``costing.bill``),
and hands it to its sinks (``deployments/gateway/audit.py``). No prompt or answer text is
recorded unless ``audit.include_text`` is on. ``slmctl audit`` and ``slmctl report`` read
the lines back with ``read_records``. The fields are documented in docs/observability.md.

Pure: no Ray, no HTTP; the only I/O is reading files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from cluster.errors import InvalidRequestError

VERSION = 1

# outcome of one model call in an audit line (costing's "lost" is "superseded": the call
# finished, but another answer was used)
CALL_OUTCOMES = ("won", "cancelled", "failed", "superseded")
_FROM_COSTING = {"won": "won", "cancelled": "cancelled", "failed": "failed", "lost": "superseded"}

# every line has exactly these keys (plus "prompt" and "answer" under include_text)
FIELDS: tuple[str, ...] = (
    "v", "request_id", "time", "ts", "api_key_hash", "requested_model", "strategy", "route", "calls", "gate_scores",
    "escalated", "race_winner", "data_class", "pii_types", "cost_usd", "energy_j", "frontier_cost_usd", "status",
    "error_code", "stream", "latency_ms", "ttft_ms",
)
ROUTE_FIELDS: tuple[str, ...] = ("model", "version", "reason", "domain", "escalation_score")
CALL_FIELDS: tuple[str, ...] = ("deployment", "model", "version", "role", "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms", "outcome")
TEXT_FIELDS: tuple[str, ...] = ("prompt", "answer")


@dataclass(frozen=True)
class CallLine:
    """One model call of a request."""

    deployment: str
    model: str
    version: str
    role: str | None  # specialist | general | frontier
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    outcome: str  # one of CALL_OUTCOMES


@dataclass(frozen=True)
class RouteLine:
    """The version that answered and why, with the router's view (domain, score)."""

    model: str
    version: str
    reason: str
    domain: str | None = None
    escalation_score: float | None = None


def call_outcome(costing_outcome: str) -> str:
    return _FROM_COSTING[costing_outcome]


def api_key_hash(authorization: str | None) -> str | None:
    """The first 16 hex digits of the SHA-256 of the bearer key: enough to tell keys apart
    in an audit, useless to call the API with. None without a bearer key."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    token = authorization[7:].strip()
    return _token_hash(token) if token else None


@functools.lru_cache(maxsize=1024)
def _token_hash(token: str) -> str:
    # A gateway sees the same few keys on every request; the cache holds only what the
    # gateway's key store already holds in memory.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# Written out rather than ``dataclasses.asdict``, which deep-copies field by field and was
# the largest part of building a line on the gateway's hot path (docs/benchmarks.md). The
# field lists above are the contract; a unit test holds these dicts to them.
def _route_dict(r: RouteLine) -> dict[str, Any]:
    return {"model": r.model, "version": r.version, "reason": r.reason, "domain": r.domain, "escalation_score": r.escalation_score}


def _call_dict(c: CallLine) -> dict[str, Any]:
    return {
        "deployment": c.deployment, "model": c.model, "version": c.version, "role": c.role, "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens, "latency_ms": _ms(c.latency_ms), "ttft_ms": _ms(c.ttft_ms), "outcome": c.outcome,
    }


def build_record(
    *,
    request_id: str,
    wall_time: float,
    api_key: str | None,
    requested_model: str | None,
    strategy: str | None,
    route: RouteLine | None,
    calls: Sequence[CallLine] = (),
    gate_scores: Sequence[float] = (),
    escalated: str | None = None,
    race_winner: str | None = None,
    data_class: str | None = None,
    pii_types: Sequence[str] = (),
    cost_usd: float = 0.0,
    energy_j: float = 0.0,
    frontier_cost_usd: float | None = None,
    status: int,
    error_code: str | None = None,
    stream: bool = False,
    latency_ms: float,
    ttft_ms: float | None = None,
    include_text: bool = False,
    prompt: str | None = None,
    answer: str | None = None,
) -> dict[str, Any]:
    """The audit line of one request. ``api_key`` is the Authorization header as sent (only
    its hash is kept). ``prompt`` and ``answer`` are kept only when ``include_text``."""
    record: dict[str, Any] = {
        "v": VERSION,
        "request_id": request_id,
        "time": round(wall_time, 6),
        "ts": datetime.fromtimestamp(wall_time, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "api_key_hash": api_key_hash(api_key),
        "requested_model": requested_model,
        "strategy": strategy,
        "route": _route_dict(route) if route is not None else None,
        "calls": [_call_dict(c) for c in calls],
        "gate_scores": [round(g, 6) for g in gate_scores],
        "escalated": escalated,
        "race_winner": race_winner,
        "data_class": data_class,
        "pii_types": list(pii_types),
        "cost_usd": cost_usd,
        "energy_j": energy_j,
        "frontier_cost_usd": frontier_cost_usd,
        "status": status,
        "error_code": error_code,
        "stream": stream,
        "latency_ms": _ms(latency_ms),
        "ttft_ms": _ms(ttft_ms),
    }
    if include_text:
        record["prompt"] = prompt
        record["answer"] = answer
    return record


def dumps(record: dict[str, Any]) -> str:
    """One line, no newline inside (JSON escapes any in the text)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


# --- reading back -------------------------------------------------------------------------


def expand(path: str | Path) -> Path:
    return Path(path).expanduser()


def files_of(path: str | Path) -> list[Path]:
    """The file and its rotated backups, oldest first (path.N ... path.1, path)."""
    base = expand(path)
    backups = []
    for p in base.parent.glob(base.name + ".*"):
        suffix = p.name[len(base.name) + 1:]
        if suffix.isdigit():
            backups.append((int(suffix), p))
    return [p for _, p in sorted(backups, reverse=True)] + ([base] if base.exists() else [])


def read_records(path: str | Path, *, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Every audit line of the file and its backups, oldest first; lines before the unix
    time ``since`` are skipped. A line that is not JSON (a torn write) is skipped too: an
    audit reader must not stop at one bad line. No file at all raises InvalidRequestError."""
    files = files_of(path)
    if not files:
        raise InvalidRequestError(f"no audit file at {expand(path)} (is audit.enabled on, and has the gateway served a request?)")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as err:
            raise InvalidRequestError(f"cannot read {f}: {err.strerror}") from None
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and (since is None or float(rec.get("time") or 0) >= since):
                yield rec


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1.5h``, ``7d`` -> seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise InvalidRequestError(f"not a duration: {text!r} (use e.g. 30s, 10m, 1h, 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def matches(record: dict[str, Any], *, model: str | None = None, status: str | None = None) -> bool:
    """``model``: the answering model (``code`` or ``code@v2``); ``status``: ``429``, or a
    class like ``4xx``."""
    if model is not None:
        route = record.get("route") or {}
        name, _, version = model.partition("@")
        if route.get("model") != name or (version and route.get("version") != version):
            return False
    if status is not None:
        got = str(record.get("status"))
        want = status.strip().lower()
        if want.endswith("xx") and len(want) == 3:
            return got[:1] == want[0]
        return got == want
    return True
