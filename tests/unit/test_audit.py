"""The audit line (cluster.audit), its sinks (deployments/gateway/audit.py) and the report's
arithmetic (cluster.report_calc): no Ray, no network."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
from pathlib import Path

import pytest

from cluster import audit, report_calc
from cluster.cli.main import main as slmctl
from cluster.config import AuditConfig
from cluster.errors import InvalidRequestError
from cluster.loader import config_from_dict
from deployments.gateway.audit import AuditTrail, FileSink, RedisStreamSink, SinkWorker

SECRET = "the prompt nobody may read"


def _record(**over):  # type: ignore[no-untyped-def]
    kw = dict(
        request_id="r1", wall_time=1_700_000_000.5, api_key="Bearer sk-test", requested_model="auto", strategy="race",
        route=audit.RouteLine("code", "v1", "domain:code", "code", 0.12),
        calls=[audit.CallLine("code-v1", "code", "v1", "specialist", 10, 16, 120.0, 30.0, "won"),
               audit.CallLine("frontier-v1", "frontier", "v1", "frontier", 10, 3, 50.0, None, "cancelled")],
        gate_scores=[0.93], escalated="false", race_winner="small", data_class="public", pii_types=(),
        cost_usd=0.001, energy_j=8.0, frontier_cost_usd=0.01, status=200, stream=True, latency_ms=130.0, ttft_ms=31.0,
        prompt=SECRET, answer="an answer",
    )
    kw.update(over)
    return audit.build_record(**kw)


# --- the line -----------------------------------------------------------------------------


def test_a_line_has_the_documented_fields_and_no_text_by_default() -> None:
    rec = _record()
    assert tuple(rec) == audit.FIELDS
    assert tuple(rec["route"]) == audit.ROUTE_FIELDS
    assert all(tuple(c) == audit.CALL_FIELDS for c in rec["calls"])
    assert rec["api_key_hash"] == hashlib.sha256(b"sk-test").hexdigest()[:16]
    assert rec["ts"] == "2023-11-14T22:13:20.500Z"
    line = audit.dumps(rec)
    assert SECRET not in line and "sk-test" not in line and "\n" not in line


def test_the_route_and_call_dicts_carry_every_field_of_their_dataclasses_with_rounded_times() -> None:
    # build_record writes these dicts out by hand (asdict is too slow for the hot path): a
    # field added to a dataclass must reach the line, and the values must be the dataclass's.
    rec = _record(calls=[audit.CallLine("code-v1", "code", "v1", "specialist", 10, 16, 120.12345, 30.98765, "won")])
    assert tuple(f.name for f in dataclasses.fields(audit.RouteLine)) == audit.ROUTE_FIELDS
    assert tuple(f.name for f in dataclasses.fields(audit.CallLine)) == audit.CALL_FIELDS
    assert rec["route"] == dataclasses.asdict(audit.RouteLine("code", "v1", "domain:code", "code", 0.12))
    assert rec["calls"] == [{"deployment": "code-v1", "model": "code", "version": "v1", "role": "specialist", "prompt_tokens": 10,
                             "completion_tokens": 16, "latency_ms": 120.123, "ttft_ms": 30.988, "outcome": "won"}]


def test_text_only_with_include_text() -> None:
    rec = _record(include_text=True)
    assert rec["prompt"] == SECRET and rec["answer"] == "an answer"
    assert set(rec) == set(audit.FIELDS) | set(audit.TEXT_FIELDS)


@pytest.mark.parametrize("header, expected", [(None, None), ("", None), ("Basic abc", None), ("Bearer ", None)])
def test_no_key_no_hash(header: str | None, expected: None) -> None:
    assert audit.api_key_hash(header) is expected


def test_costing_outcomes_map_to_audit_outcomes() -> None:
    assert [audit.call_outcome(o) for o in ("won", "lost", "cancelled", "failed")] == ["won", "superseded", "cancelled", "failed"]


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30s", 30), ("10m", 600), ("1.5h", 5400), ("7d", 604800)])
def test_durations(text: str, seconds: float) -> None:
    assert audit.parse_duration(text) == seconds


def test_a_bad_duration_is_an_error() -> None:
    with pytest.raises(InvalidRequestError):
        audit.parse_duration("soon")


def test_filters() -> None:
    rec = _record(status=429)
    assert audit.matches(rec, model="code") and audit.matches(rec, model="code@v1") and not audit.matches(rec, model="code@v2")
    assert audit.matches(rec, status="429") and audit.matches(rec, status="4xx") and not audit.matches(rec, status="5xx")


def test_reading_takes_backups_oldest_first_and_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.2").write_text(audit.dumps(_record(request_id="a", wall_time=1.0)) + "\n")
    (tmp_path / "audit.jsonl.1").write_text(audit.dumps(_record(request_id="b", wall_time=2.0)) + "\n{torn\n")
    path.write_text(audit.dumps(_record(request_id="c", wall_time=3.0)) + "\n")
    assert [r["request_id"] for r in audit.read_records(path)] == ["a", "b", "c"]
    assert [r["request_id"] for r in audit.read_records(path, since=2.0)] == ["b", "c"]
    with pytest.raises(InvalidRequestError):
        list(audit.read_records(tmp_path / "none.jsonl"))


# --- the report ---------------------------------------------------------------------------


def _lines() -> list[dict]:
    return [
        _record(request_id="1", cost_usd=0.001, energy_j=2.0, frontier_cost_usd=0.01, latency_ms=100.0, ttft_ms=10.0),
        _record(request_id="2", cost_usd=0.003, energy_j=4.0, frontier_cost_usd=0.02, latency_ms=200.0, ttft_ms=20.0,
                escalated="true", race_winner="frontier", route=audit.RouteLine("code", "v2", "split")),
        _record(request_id="3", cost_usd=0.02, energy_j=9.0, frontier_cost_usd=0.02, latency_ms=300.0, ttft_ms=None,
                route=audit.RouteLine("frontier", "v1", "escalate"), race_winner=None, strategy="route"),
        _record(request_id="4", route=None, calls=[], cost_usd=0.0, energy_j=0.0, frontier_cost_usd=None, status=400,
                error_code="invalid_json", escalated=None, race_winner=None, latency_ms=1.0, ttft_ms=None),
    ]


def test_report_totals_are_the_sums_of_the_lines() -> None:
    lines = _lines()
    s = report_calc.summarize(lines)
    assert s["requests"] == 4
    assert s["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in lines))
    assert s["energy_j"] == pytest.approx(sum(r["energy_j"] for r in lines))
    assert s["frontier_cost_usd"] == pytest.approx(0.05)
    assert s["saving_pct"] == pytest.approx((0.05 - 0.024) / 0.05 * 100)
    assert sum(m["requests"] for m in s["models"].values()) == 4
    assert s["models"]["code"]["versions"] == {"v1": {"requests": 1, "share": 0.25}, "v2": {"requests": 1, "share": 0.25}}
    assert s["models"][report_calc.NONE]["requests"] == 1
    assert s["escalation"] == {"requests": 3, "escalated": 1, "rate": pytest.approx(1 / 3)}
    assert s["race"] == {"requests": 2, "small_wins": 1, "win_rate": 0.5}
    assert s["models"]["code"]["latency_ms"] == {"p50": 150.0, "p95": 195.0}
    assert s["status"] == {"200": 3, "400": 1} and s["errors"] == 1
    assert "saving: 52.0%" in report_calc.format_text(s)
    tokens = sum(c["completion_tokens"] for r in lines for c in r["calls"])
    assert tokens > 0 and s["completion_tokens"] == tokens
    assert s["energy_j_per_token"] == pytest.approx(15.0 / tokens)
    assert "energy per token" in report_calc.format_text(s)


def test_percentiles() -> None:
    assert report_calc.percentile([], 50) is None
    assert report_calc.percentile([5.0], 95) == 5.0
    assert report_calc.percentile([1, 2, 3, 4], 50) == 2.5


def test_an_empty_report() -> None:
    s = report_calc.summarize([])
    assert s["requests"] == 0 and s["saving_pct"] is None and s["energy_j_per_token"] is None
    report_calc.format_text(s)


def test_slmctl_report_and_audit_read_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(audit.dumps(r) + "\n" for r in _lines()))
    assert slmctl(["report", "--since", "all", "--json", "--path", str(path)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["requests"] == 4 and s["cost_usd"] == pytest.approx(0.024)
    assert slmctl(["audit", "tail", "-n", "2", "--path", str(path)]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["3", "4"]
    assert slmctl(["audit", "query", "--status", "4xx", "--json", "--path", str(path)]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["4"]
    assert slmctl(["audit", "query", "--model", "code@v2", "--path", str(path)]) == 0
    assert "code@v2" in capsys.readouterr().out


def test_report_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(audit.dumps(r) + "\n" for r in _lines()))
    png = tmp_path / "report.png"
    assert slmctl(["report", "--since", "all", "--plot", str(png), "--path", str(path)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the sinks ----------------------------------------------------------------------------


class SlowSink:
    name = "slow"

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def write(self, lines: list[str]) -> None:
        await asyncio.sleep(10)

    async def close(self) -> None:
        pass


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_the_file_sink_writes_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "audit.jsonl"
    worker = SinkWorker(FileSink(str(path), max_bytes=200, backup_count=2), queue_size=100, timeout_s=5)
    for i in range(10):
        worker.put(json.dumps({"i": i, "pad": "x" * 50}))
    await _settle()
    await worker.close()
    assert worker.status()["written"] == 10 and worker.failed == 0
    assert len(audit.files_of(path)) == 3  # the file and two backups; older lines rotated away


async def test_an_unwritable_path_is_counted_never_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    worker = SinkWorker(FileSink(str(blocker / "audit.jsonl"), 0, 0), queue_size=100, timeout_s=5)
    worker.put("{}")
    worker.put("{}")
    await _settle()
    await worker.close()
    assert worker.written == 0 and worker.failed == 2 and "Error" in (worker.last_error or "")


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_dead_redis_is_counted_never_raised() -> None:
    sink = RedisStreamSink(f"redis://127.0.0.1:{_dead_port()}/0", "slm:audit", 100, password=None, timeout_s=0.2)
    worker = SinkWorker(sink, queue_size=100, timeout_s=1)
    worker.put("{}")
    await _settle()
    await worker.close()
    assert worker.written == 0 and worker.failed == 1


async def test_a_full_queue_drops_and_counts_and_a_slow_sink_times_out() -> None:
    worker = SinkWorker(SlowSink(), queue_size=2, timeout_s=0.05)
    for _ in range(5):
        worker.put("{}")  # the first is taken at once by the drain task only after a switch
    assert worker.dropped == 3
    await asyncio.sleep(0.3)
    await worker.close()
    assert worker.failed == 2 and worker.written == 0


def _cfg(tmp_path: Path, **audit_cfg):  # type: ignore[no-untyped-def]
    return config_from_dict({
        "models": [{"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}],
        "audit": {"path": str(tmp_path / "audit.jsonl"), **audit_cfg},
    })


async def test_the_trail_writes_one_line_per_draft_and_none_when_disabled(tmp_path: Path) -> None:
    trail = AuditTrail.from_config(_cfg(tmp_path), {}, clock=lambda: 1.0)
    draft = trail.start("rid", "Bearer k", 0.5)
    draft.requested_model = "nope"
    trail.finish(draft, 404, "model_not_found")
    trail.finish(draft, 500)  # once per draft
    await _settle()
    await trail.close()
    (line,) = list(audit.read_records(tmp_path / "audit.jsonl"))
    assert line["status"] == 404 and line["error_code"] == "model_not_found" and line["latency_ms"] == 500.0
    assert trail.status()["sinks"]["file"]["written"] == 1
    off = AuditTrail.from_config(_cfg(tmp_path / "off", enabled=False), {}, clock=lambda: 1.0)
    off.finish(off.start("x", None, 0.0), 200)
    assert off.status()["sinks"] == {} and not (tmp_path / "off").exists()


def test_audit_config_defaults() -> None:
    a = AuditConfig()
    assert a.enabled and not a.include_text and a.path == "~/.cache/slm-cluster/audit/audit.jsonl"
    assert all(f.description for f in AuditConfig.model_fields.values())
