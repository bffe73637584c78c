"""The audit trail through real HTTP on Serve with fake engines: one line per request
(streamed, not streamed, and refused) with the documented fields and no prompt text;
``slmctl report`` totals equal the sums of the lines; and a gateway whose audit file
cannot be written still answers every request, counting the failures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import audit
from cluster.loader import config_from_dict
from tests.integration.conftest import ray_local  # noqa: F401 - fixture
from tests.integration.slmctl import slmctl

pytestmark = pytest.mark.integration

TOKENS = 8
MARKER = "PROMPT-MARKER-7f3a"
SMALL = {"usd_per_million_input_tokens": 1.0, "usd_per_million_output_tokens": 2.0, "joules_per_token": 0.5}
FRONTIER = {"usd_per_million_input_tokens": 10.0, "usd_per_million_output_tokens": 20.0, "joules_per_token": 3.0}


def _fake(name: str, cost: dict = SMALL, **engine: Any) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": TOKENS, "tokens_per_s": 400, **engine},
            "resources": {"num_cpus": 0.05}, "cost": cost}


def _config(name: str, audit_path: str, *, full: bool) -> dict:
    models: list[dict] = [{"name": "general", "role": "general", "versions": [_fake("v1")]}]
    if full:
        models = [{"name": "code", "role": "specialist", "domains": ["code"], "versions": [_fake("v1")]}, *models,
                  {"name": "frontier", "role": "frontier", "versions": [_fake("v1", FRONTIER, ttft_ms=200)]}]
    return {
        "name": name,
        "models": models,
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "gateway": {"resources": {"num_cpus": 0.05}, "default_max_tokens": TOKENS, "first_token_timeout_s": 5, "request_timeout_s": 20},
        "audit": {"path": audit_path},
    }


@pytest.fixture(scope="module")
def setup(ray_local: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    folder = tmp_path_factory.mktemp("audit")
    good = folder / "trail" / "audit.jsonl"
    blocker = folder / "not-a-folder"
    blocker.write_text("")
    serve.run(build_from_config(config_from_dict(_config("audited", str(good), full=True))), name="audited", route_prefix="/")
    serve.run(build_from_config(config_from_dict(_config("broken", str(blocker / "audit.jsonl"), full=False))),
              name="broken", route_prefix="/broken")
    return {"base_url": ray_local["base_url"], "path": good}


def _client(base_url: str, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}{prefix}/v1", api_key="sk-audit-test", max_retries=0, timeout=30)


def _ask(base_url: str, model: str, *, stream: bool = False, strategy: str | None = None, prefix: str = "") -> dict[str, str]:
    extra = {"x-slm-strategy": strategy} if strategy else {}
    raw = _client(base_url, prefix).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"write a python function {MARKER}"}], stream=stream, extra_headers=extra
    )
    body = raw.parse()
    if stream:
        for _ in body:
            pass
    return dict(raw.headers)


def _lines(path: Path, n: int, timeout_s: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(audit.read_records(path)) if audit.files_of(path) else []
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_one_line_per_request_with_the_documented_fields_and_no_text(setup: dict) -> None:
    base, path = setup["base_url"], setup["path"]
    answered = [
        _ask(base, "auto"),
        _ask(base, "auto", stream=True),
        _ask(base, "code", strategy="cascade"),
        _ask(base, "auto", stream=True, strategy="race"),
        _ask(base, "general", strategy="race"),
    ]
    with pytest.raises(openai.NotFoundError):
        _ask(base, "no-such-model")
    n = len(answered) + 1
    lines = _lines(path, n)
    time.sleep(0.5)  # nothing more may come
    lines = list(audit.read_records(path))
    assert len(lines) == n
    text = "".join(f.read_text() for f in audit.files_of(path))
    assert MARKER not in text and "sk-audit-test" not in text
    for rec in lines:
        assert tuple(rec) == audit.FIELDS, rec
        for call in rec["calls"]:
            assert tuple(call) == audit.CALL_FIELDS and call["outcome"] in audit.CALL_OUTCOMES
        assert rec["api_key_hash"] == audit.api_key_hash("Bearer sk-audit-test")
    by_id = {r["request_id"]: r for r in lines}
    for headers in answered:
        rec = by_id[headers["x-request-id"]]
        assert rec["status"] == 200 and rec["error_code"] is None
        assert rec["route"]["model"] == headers["x-slm-model"] and rec["route"]["version"] == headers["x-slm-version"]
        assert rec["strategy"] == headers["x-slm-strategy"] and rec["escalated"] == headers["x-slm-escalated"]
        assert any(c["outcome"] == "won" for c in rec["calls"])
        if "x-slm-cost-usd" in headers:  # not streamed: the cost went out as a header
            assert format(rec["cost_usd"], ".8g") == headers["x-slm-cost-usd"]
            assert format(rec["frontier_cost_usd"], ".8g") == headers["x-slm-frontier-cost-usd"]
    assert sum(r["stream"] for r in lines) == 2
    (refused,) = [r for r in lines if r["status"] >= 400]
    assert refused["status"] == 404 and refused["requested_model"] == "no-such-model" and refused["calls"] == []

    report = slmctl("report", "--since", "all", "--json", "--path", str(path), timeout_s=120)
    assert report.code == 0, report.out
    s = json.loads(report.out)
    assert s["requests"] == n
    assert s["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in lines))
    assert s["energy_j"] == pytest.approx(sum(r["energy_j"] for r in lines))
    assert s["frontier_cost_usd"] == pytest.approx(sum(r["frontier_cost_usd"] or 0 for r in lines))
    assert sum(m["requests"] for m in s["models"].values()) == n
    print("\n" + slmctl("report", "--since", "all", "--path", str(path), timeout_s=120).out)  # the example in the docs


def test_legacy_completions_get_their_line_too(setup: dict) -> None:
    base, path = setup["base_url"], setup["path"]
    before = len(list(audit.read_records(path)))
    answered = []
    for stream in (False, True):
        raw = _client(base).completions.with_raw_response.create(model="general", prompt=f"Once upon a time {MARKER}", stream=stream,
                                                                 max_tokens=TOKENS)
        body = raw.parse()
        if stream:
            for _ in body:
                pass
        answered.append(dict(raw.headers))
    lines = _lines(path, before + 2)[before:]
    assert len(lines) == 2 and MARKER not in "".join(f.read_text() for f in audit.files_of(path))
    for headers, rec in zip(answered, lines):
        assert tuple(rec) == audit.FIELDS and rec["request_id"] == headers["x-request-id"]
        assert (rec["status"], rec["strategy"], rec["requested_model"]) == (200, "route", "general")
        assert rec["route"]["model"] == headers["x-slm-model"] == "general"
        assert [c["outcome"] for c in rec["calls"]] == ["won"] and rec["calls"][0]["completion_tokens"] == TOKENS
    assert [r["stream"] for r in lines] == [False, True]


def test_a_failing_sink_does_not_fail_requests(setup: dict) -> None:
    base = setup["base_url"]
    for stream in (False, True, False):
        _ask(base, "auto", stream=stream, prefix="/broken")  # raises on any error
    deadline = time.monotonic() + 15
    while True:
        status = httpx.get(f"{base}/broken/v1/slm/audit", timeout=10).json()
        sink = status["sinks"]["file"]
        if sink["failed"] >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sink["failed"] == 3 and sink["written"] == 0 and sink["last_error"]


def test_a_client_that_leaves_before_the_answer_still_gets_its_line(setup: dict) -> None:
    """Serve cancels the handler when the client disconnects; the line is written as 499."""
    base, path = setup["base_url"], setup["path"]
    body = {"model": "frontier", "messages": [{"role": "user", "content": f"slow please {MARKER}"}]}
    with pytest.raises(httpx.TimeoutException):
        # The frontier takes 200 ms to its first token; the client gives up after 50 ms.
        httpx.post(f"{base}/v1/chat/completions", json=body, headers={"x-request-id": "leaver-1"}, timeout=0.05)
    deadline = time.monotonic() + 15
    while True:
        found = [r for r in audit.read_records(path) if r["request_id"] == "leaver-1"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(found) == 1, "the request of a client that left has no audit line"
    assert (found[0]["status"], found[0]["error_code"]) == (499, "client_disconnected")
