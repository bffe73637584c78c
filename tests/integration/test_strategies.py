"""The ensemble deciding, through real HTTP with the official ``openai`` client, on Serve
with fake engines (and a real OpenAI-compatible upstream for the external frontier):
route with escalation, cascade, race with cancellation, the hedge budget, latency
budgets, the data policy and the PII screen, and frontier failures."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from cluster import pii
from cluster.loader import config_from_dict
from tests.fakes.openai_upstream import OpenAIUpstream
from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

TOKENS = 16


SMALL_COST = {"usd_per_million_input_tokens": 1.0, "usd_per_million_output_tokens": 2.0, "joules_per_token": 0.5}
FRONTIER_COST = {"usd_per_million_input_tokens": 10.0, "usd_per_million_output_tokens": 20.0, "joules_per_token": 3.0}


def _fake(name: str, cost: dict = SMALL_COST, **engine: Any) -> dict:
    return {
        "name": name,
        "engine": {"kind": "fake", "default_completion_tokens": TOKENS, "tokens_per_s": 400, **engine},
        "resources": {"num_cpus": 0.05},
        "cost": cost,
    }


def _config(name: str, frontier: dict, **extra: Any) -> dict:
    return {
        "name": name,
        "models": [
            {
                "name": "code",
                "role": "specialist",
                "domains": ["code"],
                "versions": [_fake("sure"), _fake("unsure", unsure_share=1.0), _fake("broken", failure_rate=1.0),
                             _fake("slowsure", ttft_ms=400)],
            },
            {"name": "general", "role": "general", "versions": [_fake("v1")]},
            {"name": "frontier", "role": "frontier", "versions": [frontier]},
        ],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "gateway": {"resources": {"num_cpus": 0.05}, "default_max_tokens": TOKENS, "first_token_timeout_s": 5, "request_timeout_s": 20},
        **extra,
    }


# The frontier: slow to start, like a remote API, and external.
SLOW_FRONTIER = {**_fake("v1", FRONTIER_COST, ttft_ms=400, tokens_per_s=100), "location": "external"}

APPS = {
    # name: (route prefix, config)
    "ens": ("/", _config("ens", SLOW_FRONTIER)),
    "down": ("/down", _config("down", {**_fake("v1", FRONTIER_COST, failure_rate=1.0, failure_error="unavailable"), "location": "external"})),
    "hedge": (
        "/hedge",
        _config(
            "hedge",
            SLOW_FRONTIER,
            strategy={"race": {"max_hedged_share": 0.5, "hedge_burst": 1}},
            # every auto request clears the escalation bar
            router={"kind": "heuristic", "escalation_threshold": 0.0, "resources": {"num_cpus": 0.05}},
        ),
    ),
    "delayed": ("/delayed", _config("delayed", SLOW_FRONTIER, strategy={"race": {"hedge_after_ms": 3000}})),
}


@pytest.fixture(scope="module")
def upstream():
    # A slow external frontier: 0.3 s to the first byte, then 20 tokens a second.
    with OpenAIUpstream(first_byte_delay_s=0.3, token_delay_s=0.05, answer_tokens=TOKENS) as up:
        yield up


@pytest.fixture(scope="module")
def base_url(ray_local: dict, upstream: OpenAIUpstream) -> str:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    remote = {"name": "v1", "engine": {"kind": "remote_openai", "base_url": upstream.base_url, "model": "up"}, "resources": {"num_cpus": 0.05}}
    apps = dict(APPS)
    apps["remote"] = ("/remote", _config("remote", remote, policy={"pii": "redact"}))
    apps["remote_detect"] = ("/rdetect", _config("rdetect", remote))
    apps["inline"] = ("/inline", _config("inline", {**remote, "runs_in": "gateway"}))  # no frontier deployment
    for name, (prefix, cfg) in apps.items():
        serve.run(build_from_config(config_from_dict(cfg)), name=name, route_prefix=prefix)
    return ray_local["base_url"]


def client(base_url: str, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}{prefix}/v1", api_key="unused", max_retries=0, timeout=30)


def ask(base_url: str, model: str, strategy: str | None = None, *, prefix: str = "", stream: bool = False,
        content: str = "write a function", headers: dict | None = None) -> tuple[dict[str, str], str, str]:
    """(response headers, answer text, body model) through the openai client."""
    extra = dict(headers or {})
    if strategy is not None:
        extra["x-slm-strategy"] = strategy
    raw = client(base_url, prefix).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], stream=stream, extra_headers=extra
    )
    if stream:
        text, served = "", ""
        for chunk in raw.parse():
            served = chunk.model
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return dict(raw.headers), text, served
    completion = raw.parse()
    return dict(raw.headers), completion.choices[0].message.content or "", completion.model


def engine_stats(app: str, deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result(timeout_s=10)


def wait_for(check, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# --- each strategy, streamed and not ----------------------------------------------------

# (strategy, small version, answering model, escalated, race winner)
CASES = [
    ("route", "sure", "code@sure", "false", None),
    ("route", "unsure", "code@unsure", "false", None),
    ("cascade", "sure", "code@sure", "false", None),
    ("cascade", "unsure", "frontier@v1", "true", None),
    ("race", "sure", "code@sure", "false", "small"),
    ("race", "unsure", "frontier@v1", "true", "frontier"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("strategy", "small", "served", "escalated", "winner"), CASES)
def test_each_strategy(base_url: str, strategy: str, small: str, served: str, escalated: str, winner: str | None, stream: bool) -> None:
    headers, text, model = ask(base_url, f"code@{small}", strategy, stream=stream)
    assert model == served
    assert len(text.split()) == TOKENS  # a whole answer, never a cut one
    assert headers["x-slm-strategy"] == strategy
    assert headers["x-slm-escalated"] == escalated
    assert headers["x-slm-data-class"] == "public"
    assert headers.get("x-slm-race-winner") == winner
    if strategy == "route":
        assert "x-slm-gate-score" not in headers
    else:
        score = float(headers["x-slm-gate-score"])
        assert (score >= 0.85) == (small == "sure")
    if strategy == "race" and small == "sure":
        assert headers["x-slm-cancelled"] == "frontier-v1"
    if not stream:
        assert float(headers["x-slm-cost-usd"]) > 0 and float(headers["x-slm-frontier-cost-usd"]) > 0


def _cost(prompt: int, completion: int, price: dict) -> tuple[float, float]:
    usd = (prompt * price["usd_per_million_input_tokens"] + completion * price["usd_per_million_output_tokens"]) / 1e6
    return usd, completion * price["joules_per_token"]


def test_what_each_answer_cost(base_url: str) -> None:
    """Every call counts (the small answer a cascade escalated from, too), and the
    frontier-only figure prices this request's tokens at the frontier's rates."""
    with httpx.Client(base_url=base_url, timeout=30) as c:
        def post(model: str, strategy: str) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": "write a function"}]}
            return c.post("/v1/chat/completions", json=body, headers={"x-slm-strategy": strategy})

        resp = post("code@sure", "route")
        p, n = resp.json()["usage"]["prompt_tokens"], resp.json()["usage"]["completion_tokens"]
        usd, joules = _cost(p, n, SMALL_COST)
        assert float(resp.headers["x-slm-cost-usd"]) == pytest.approx(usd)
        assert float(resp.headers["x-slm-energy-j"]) == pytest.approx(joules)
        assert float(resp.headers["x-slm-frontier-cost-usd"]) == pytest.approx(_cost(p, n, FRONTIER_COST)[0])

        resp = post("code@unsure", "cascade")  # the small answer was paid for, then the frontier's
        assert resp.json()["model"] == "frontier@v1"
        p, n = resp.json()["usage"]["prompt_tokens"], resp.json()["usage"]["completion_tokens"]
        small, big = _cost(p, TOKENS, SMALL_COST), _cost(p, n, FRONTIER_COST)
        assert float(resp.headers["x-slm-cost-usd"]) == pytest.approx(small[0] + big[0])
        assert float(resp.headers["x-slm-energy-j"]) == pytest.approx(small[1] + big[1])
        assert float(resp.headers["x-slm-frontier-cost-usd"]) == pytest.approx(big[0])


def test_default_strategy_is_route_and_unknown_ones_are_400(base_url: str) -> None:
    headers, _, _ = ask(base_url, "code@unsure")
    assert headers["x-slm-strategy"] == "route"
    with pytest.raises(openai.BadRequestError) as err:
        ask(base_url, "code@sure", "fastest")
    assert err.value.body["param"] == "x-slm-strategy"
    with pytest.raises(openai.BadRequestError) as err:
        ask(base_url, "code@sure", "cascade", headers={"x-slm-latency-budget-ms": "soon"})
    assert err.value.body["param"] == "x-slm-latency-budget-ms"
    with pytest.raises(openai.BadRequestError) as err:
        ask(base_url, "code@sure", headers={"x-slm-data-class": "secret"})
    assert err.value.body["param"] == "x-slm-data-class"


def test_route_escalates_auto_when_the_score_clears_the_bar(base_url: str) -> None:
    headers, _, model = ask(base_url, "auto", "route", prefix="/hedge")
    assert model == "frontier@v1"
    assert headers["x-slm-route-reason"] == "frontier:escalated"
    assert headers["x-slm-escalated"] == "true"
    # A budget the frontier cannot meet keeps the small answer.
    headers, _, model = ask(base_url, "auto", "route", prefix="/hedge", headers={"x-slm-latency-budget-ms": "100"})
    assert model != "frontier@v1" and headers["x-slm-escalated"] == "skipped-budget"
    # Without the bar cleared (the default app's router scores below its threshold) auto stays small.


# --- cancellation: the cancelled call really stops in its engine ------------------------


def test_race_cancels_the_fake_frontier_in_its_engine(base_url: str) -> None:
    before = engine_stats("ens", "frontier-v1")
    headers, _, _ = ask(base_url, "code@sure", "race", headers={"x-request-id": "race-cancel-1"})
    assert headers["x-slm-cancelled"] == "frontier-v1"
    after = wait_for(lambda: (s := engine_stats("ens", "frontier-v1"))["aborted"] > before["aborted"] and s)
    assert after and after["aborted"] == before["aborted"] + 1
    assert after["completed"] == before["completed"] and after["active"] == 0
    abort = next(a for a in after["recent_aborts"] if a["request_id"] == "race-cancel-1:frontier-v1")
    # cancelled while waiting for its first token (400 ms): it produced nothing
    assert abort["tokens"] == 0


@pytest.mark.parametrize("prefix", ["/remote", "/inline"])
def test_race_cancels_the_remote_openai_frontier_upstream(base_url: str, upstream: OpenAIUpstream, prefix: str) -> None:
    # The small answer takes 0.4 s: long enough for the frontier's request to reach the
    # upstream even on a busy machine, short of the upstream's 1.1 s answer. /inline runs
    # the frontier in the gateway (runs_in: gateway): the same cancellation, no Serve hop.
    before_requests, before_gone = upstream.requests, upstream.disconnected
    headers, _, model = ask(base_url, "code@slowsure", "race", prefix=prefix)
    assert model == "code@slowsure" and headers["x-slm-cancelled"] == "frontier-v1"
    assert wait_for(lambda: upstream.disconnected > before_gone)
    assert upstream.requests == before_requests + 1 and upstream.disconnected == before_gone + 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_frontier_in_the_gateway_answers_escalations_without_a_deployment(base_url: str, upstream: OpenAIUpstream, stream: bool) -> None:
    from ray import serve

    assert "frontier-v1" not in serve.status().applications["inline"].deployments
    ready = httpx.get(f"{base_url}/inline/readyz", timeout=10).json()
    assert ready["ready"] and {"deployment": "frontier-v1", "ready": True, "runs_in": "gateway"} in ready["deployments"]
    before = upstream.completed
    headers, text, model = ask(base_url, "code@unsure", "cascade", prefix="/inline", stream=stream)
    assert headers["x-slm-escalated"] == "true" and model == "frontier@v1" and headers["x-slm-model"] == "frontier"
    assert len(text.split()) == TOKENS and upstream.completed == before + 1
    headers, _, model = ask(base_url, "frontier", prefix="/inline", stream=stream)  # named: straight to the upstream
    assert model == "frontier@v1" and upstream.completed == before + 2


def test_the_hedge_budget_caps_frontier_calls(base_url: str) -> None:
    before = engine_stats("hedge", "frontier-v1")
    cancelled = [ask(base_url, "code@sure", "race", prefix="/hedge")[0].get("x-slm-cancelled") for _ in range(10)]
    # share 0.5 with a burst of one: every other race starts a frontier call
    assert cancelled.count("frontier-v1") == 5
    after = wait_for(lambda: (s := engine_stats("hedge", "frontier-v1"))["aborted"] >= before["aborted"] + 5 and s)
    assert after["aborted"] - before["aborted"] == 5 and after["completed"] == before["completed"]
    # Over the budget a race runs as a cascade: an unsure answer still escalates.
    answers = [ask(base_url, "code@unsure", "race", prefix="/hedge")[0]["x-slm-escalated"] for _ in range(4)]
    assert answers == ["true"] * 4


def test_a_hedged_frontier_never_starts_when_the_small_answer_passes_first(base_url: str) -> None:
    before = engine_stats("delayed", "frontier-v1")
    headers, _, model = ask(base_url, "code@sure", "race", prefix="/delayed")
    assert model == "code@sure" and "x-slm-cancelled" not in headers
    after = engine_stats("delayed", "frontier-v1")
    assert (after["aborted"], after["completed"]) == (before["aborted"], before["completed"])
    # An unsure answer does not wait out the hedge delay: it escalates at once.
    t0 = time.monotonic()
    headers, _, model = ask(base_url, "code@unsure", "race", prefix="/delayed")
    assert model == "frontier@v1" and time.monotonic() - t0 < 2.5


# --- frontier failures: the small answer, flagged ----------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("strategy", ["cascade", "race"])
def test_frontier_failure_returns_the_small_answer_flagged(base_url: str, strategy: str, stream: bool) -> None:
    headers, text, model = ask(base_url, "code@unsure", strategy, prefix="/down", stream=stream)
    assert model == "code@unsure" and len(text.split()) == TOKENS
    assert headers["x-slm-escalated"] == "failed"


def test_a_failed_small_model_escalates(base_url: str) -> None:
    headers, _, model = ask(base_url, "code@broken", "cascade")
    assert model == "frontier@v1" and headers["x-slm-escalated"] == "true"


# --- latency budget ----------------------------------------------------------------------


def test_a_tight_budget_skips_the_escalation(base_url: str) -> None:
    for strategy in ("cascade", "race"):
        headers, _, model = ask(base_url, "code@unsure", strategy, headers={"x-slm-latency-budget-ms": "150"})
        assert model == "code@unsure", strategy
        assert headers["x-slm-escalated"] == "skipped-budget"
    headers, _, model = ask(base_url, "code@unsure", "cascade", headers={"x-slm-latency-budget-ms": "60000"})
    assert model == "frontier@v1"


# --- data policy and PII -----------------------------------------------------------------

PII_PROMPTS = [
    "Email jane.roe@example.org about the bug",
    "Charge card 4111 1111 1111 1111 for the order",
    "My IBAN is GB82 WEST 1234 5698 7654 32, check it",
    "Call me on (415) 555-2671 tonight",
    "SSN 536-90-4399 on the form",
    "Why does 10.20.30.40 not answer pings?",
    "Debug this: client = OpenAI(api_key='sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2m3N4')",
]


def test_restricted_data_never_reaches_an_external_model(base_url: str) -> None:
    # Detected PII makes the request restricted: the external frontier is off limits.
    headers, _, model = ask(base_url, "code@unsure", "cascade", content=PII_PROMPTS[0])
    assert model == "code@unsure" and headers["x-slm-data-class"] == "restricted" and headers["x-slm-pii"] == "EMAIL"
    headers, _, model = ask(base_url, "code@unsure", "race", content=PII_PROMPTS[1])
    assert model == "code@unsure" and "x-slm-cancelled" not in headers
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(base_url, "frontier", content=PII_PROMPTS[2])
    assert err.value.body["code"] == "data_policy_violation"
    with pytest.raises(openai.PermissionDeniedError):
        ask(base_url, "frontier", headers={"x-slm-data-class": "internal"})
    headers, _, model = ask(base_url, "frontier", headers={"x-slm-data-class": "public"})
    assert model == "frontier@v1"


def test_detect_mode_sends_nothing_with_pii_to_the_recording_upstream(base_url: str, upstream: OpenAIUpstream) -> None:
    sent = len(upstream.bodies)
    for prompt in PII_PROMPTS:
        for strategy in ("cascade", "race"):
            headers, _, model = ask(base_url, "code@unsure", strategy, prefix="/rdetect", content=prompt)
            assert model == "code@unsure" and headers["x-slm-data-class"] == "restricted", prompt
    assert len(upstream.bodies) == sent


def test_redact_mode_sends_placeholders_never_values(base_url: str, upstream: OpenAIUpstream) -> None:
    """Every positive row of the PII table (tests/unit/test_pii.py) and the prompts above,
    through each path that reaches the external frontier."""
    from tests.unit.test_pii import CASES

    sent = len(upstream.bodies)
    for prompt in PII_PROMPTS + [text for text, kinds in CASES if kinds]:
        values = [prompt[s.start : s.end] for s in pii.find(prompt)]
        assert values, prompt
        for strategy in ("cascade", "race"):
            headers, _, model = ask(base_url, "code@unsure", strategy, prefix="/remote", content=prompt)
            assert model == "frontier@v1" and headers["x-slm-pii"], prompt
        ask(base_url, "frontier", prefix="/remote", content=prompt)
        ask(base_url, "code@unsure", prefix="/remote", content=prompt)  # on-prem: unredacted, never upstream
        bodies = upstream.bodies[sent:]
        assert len(bodies) == 3
        texts = [str(m.get("content", "")) for b in bodies for m in b["messages"]]
        assert not [v for v in values for t in texts if v in t], prompt  # compared decoded, not as JSON
        assert all("[" in t for t in texts if t.strip())
        sent = len(upstream.bodies)


# --- the stream's trailer carries the cost -----------------------------------------------


def test_streamed_answers_end_with_a_cost_trailer(base_url: str) -> None:
    body = {"model": "code@unsure", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.Client(base_url=base_url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"x-slm-strategy": "cascade"}) as resp:
            lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    trailer = next(line for line in lines if line.startswith(": x-slm-trailer "))
    costs = json.loads(trailer.removeprefix(": x-slm-trailer "))
    assert set(costs) == {"x-slm-cost-usd", "x-slm-energy-j", "x-slm-frontier-cost-usd"}
