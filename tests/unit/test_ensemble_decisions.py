"""Table tests for every pure decision of the ensemble: strategy choice, plans, budgets,
the hedge bucket, latency estimates, the gate's score and bar, the data policy, cost."""

from __future__ import annotations

import math

import pytest

from cluster import costing, gate, policy, strategy
from cluster.config import GateConfig, PolicyConfig, StrategyConfig
from cluster.errors import ConfigError, InvalidRequestError, PIIDetectedError, PolicyViolationError
from cluster.loader import config_from_dict
from cluster.types import ChatMessage, RouteDecision


def _v(name: str = "v1", **extra: object) -> dict:
    return {"name": name, "engine": {"kind": "fake"}, **extra}


def make_config(**extra: object):
    base = {
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "versions": [_v(), _v("ext", location="external")]},
            {"name": "general", "role": "general", "versions": [_v()]},
            {"name": "frontier", "role": "frontier", "versions": [_v(location="external", expected_latency_ms=2000)]},
        ]
    }
    base.update(extra)
    return config_from_dict(base)


CFG = make_config()
PUBLIC = policy.Screened("public", (), ())
RESTRICTED = policy.Screened("restricted", ("EMAIL",), None)
EXPECTED = {"code-v1": 500.0, "general-v1": 800.0, "frontier-v1": 2000.0}


def routed(score: float | None = 0.9, threshold: float | None = 0.5, model: str = "code", version: str = "v1") -> RouteDecision:
    return RouteDecision(model, version, "domain:code", domain="code", confidence=0.9, escalation_score=score, escalation_threshold=threshold)


# --- strategy and header parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "default", "expected"),
    [(None, "route", "route"), (None, "race", "race"), ("cascade", "route", "cascade"), (" RACE ", "route", "race")],
)
def test_parse_strategy(header, default, expected) -> None:
    assert strategy.parse_strategy(header, StrategyConfig(default=default)) == expected


@pytest.mark.parametrize("header", ["", "fastest", "route,race"])
def test_unknown_strategy_names_the_header(header: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        strategy.parse_strategy(header, StrategyConfig())
    assert err.value.param == "x-slm-strategy" and err.value.http_status == 400


@pytest.mark.parametrize(("header", "expected"), [(None, None), ("250", 250.0), (" 1.5 ", 1.5)])
def test_parse_budget(header, expected) -> None:
    assert strategy.parse_budget(header) == expected


@pytest.mark.parametrize("header", ["0", "-5", "soon", "nan", "inf", ""])
def test_bad_budget(header: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        strategy.parse_budget(header)
    assert err.value.param == "x-slm-latency-budget-ms"


@pytest.mark.parametrize(
    ("elapsed", "expected_ms", "budget", "ok"),
    [(0, 2000, None, True), (0, 2000, 2000, True), (1, 2000, 2000, False), (500, 400, 1000, True), (700, 400, 1000, False)],
)
def test_fits(elapsed, expected_ms, budget, ok) -> None:
    assert strategy.fits(elapsed, expected_ms, budget) is ok


# --- plans ---------------------------------------------------------------------------


def plan(name: str, first: RouteDecision, *, auto: bool = True, screened=PUBLIC, budget=None, cfg=CFG) -> strategy.Plan:
    return strategy.plan(cfg, name, first, auto=auto, screened=screened, budget_ms=budget, expected_ms=EXPECTED)


def names(p: strategy.Plan) -> list[str]:
    return [t.deployment_name for t in p.tiers]


@pytest.mark.parametrize(
    ("first", "auto", "screened", "budget", "tiers", "escalated", "skipped"),
    [
        (routed(0.9, 0.5), True, PUBLIC, None, ["frontier-v1"], "true", None),  # escalates
        (routed(0.2, 0.5), True, PUBLIC, None, ["code-v1"], "false", None),  # below the bar
        (routed(0.5, 0.5), True, PUBLIC, None, ["frontier-v1"], "true", None),  # at the bar
        (routed(0.9, None), True, PUBLIC, None, ["code-v1"], "false", None),  # no calibrated bar
        (routed(0.9, 0.5), False, PUBLIC, None, ["code-v1"], "false", None),  # named models never escalate
        (routed(0.9, 0.5), True, RESTRICTED, None, ["code-v1"], "false", "policy"),
        (routed(0.9, 0.5), True, PUBLIC, 1000, ["code-v1"], "skipped-budget", "budget"),
        (routed(0.9, 0.5), True, PUBLIC, 2500, ["frontier-v1"], "true", None),
    ],
)
def test_route_plan(first, auto, screened, budget, tiers, escalated, skipped) -> None:
    p = plan("route", first, auto=auto, screened=screened, budget=budget)
    assert (names(p), p.escalated, p.frontier_skipped) == (tiers, escalated, skipped)
    if escalated == "true":
        assert p.tiers[0].reason == "frontier:escalated" and p.tiers[0].domain == "code"


def test_route_escalation_can_be_turned_off() -> None:
    cfg = make_config(strategy={"escalate": False})
    assert names(plan("route", routed(), cfg=cfg)) == ["code-v1"]


@pytest.mark.parametrize(
    ("tiers_cfg", "first", "screened", "expected", "skipped"),
    [
        (["routed", "frontier"], routed(), PUBLIC, ["code-v1", "frontier-v1"], None),
        (["routed", "general", "frontier"], routed(), PUBLIC, ["code-v1", "general-v1", "frontier-v1"], None),
        # the router picked the general model: it is the routed tier, and listed once
        (["routed", "general", "frontier"], routed(model="general"), PUBLIC, ["general-v1", "frontier-v1"], None),
        (["routed", "frontier"], routed(), RESTRICTED, ["code-v1"], "policy"),
        (["routed", "general"], routed(), PUBLIC, ["code-v1", "general-v1"], None),
        (["general", "frontier"], routed(), PUBLIC, ["code-v1", "general-v1", "frontier-v1"], None),  # routed always first
    ],
)
def test_cascade_plan(tiers_cfg, first, screened, expected, skipped) -> None:
    cfg = make_config(strategy={"cascade_tiers": tiers_cfg})
    p = plan("cascade", first, screened=screened, cfg=cfg)
    assert (names(p), p.frontier_skipped) == (expected, skipped)


@pytest.mark.parametrize(
    ("screened", "budget", "expected", "skipped"),
    [(PUBLIC, None, ["code-v1", "frontier-v1"], None), (RESTRICTED, None, ["code-v1"], "policy"), (PUBLIC, 1500, ["code-v1"], "budget")],
)
def test_race_plan(screened, budget, expected, skipped) -> None:
    p = plan("race", routed(), screened=screened, budget=budget)
    assert (names(p), p.frontier_skipped) == (expected, skipped)


def test_a_named_frontier_is_answered_directly_under_any_strategy() -> None:
    frontier = RouteDecision("frontier", "v1", "named")
    for name in ("route", "cascade", "race"):
        assert names(plan(name, frontier, auto=False)) == ["frontier-v1"]


def test_without_a_frontier_nothing_escalates() -> None:
    cfg = config_from_dict({"models": [{"name": "general", "role": "general", "versions": [_v()]}]})
    first = routed(model="general")
    assert names(plan("route", first, cfg=cfg)) == ["general-v1"]
    p = plan("race", first, cfg=cfg)
    assert names(p) == ["general-v1"] and p.frontier_skipped == "absent"


def test_config_rules_for_tiers() -> None:
    with pytest.raises(ConfigError, match="last tier"):
        make_config(strategy={"cascade_tiers": ["frontier", "routed"]})
    with pytest.raises(ConfigError, match="once"):
        make_config(strategy={"cascade_tiers": ["routed", "routed"]})


# --- hedge budget and latency estimates ------------------------------------------------


@pytest.mark.parametrize(
    ("share", "burst", "requests", "hedged"),
    [(1.0, 10, 20, 20), (0.5, 1, 10, 5), (0.25, 1, 20, 5), (0.0, 10, 10, 0), (0.5, 4, 10, 8)],
)
def test_hedge_budget(share: float, burst: int, requests: int, hedged: int) -> None:
    bucket = strategy.HedgeBudget(share, burst)
    count = 0
    for _ in range(requests):
        bucket.offer()
        count += bucket.take()
    assert count == hedged


def test_latency_estimates_start_from_the_prior_then_follow_traffic() -> None:
    est = strategy.LatencyEstimates({"a": 1000.0}, alpha=0.5)
    assert est.expected("a") == 1000.0 and est.expected("unknown") == 0.0
    est.observe("a", 200.0)  # the first observation replaces the prior
    assert est.expected("a") == 200.0
    est.observe("a", 400.0)
    assert est.expected("a") == 300.0


def test_latency_priors_from_config() -> None:
    cfg = config_from_dict(
        {
            "models": [
                {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake", "ttft_ms": 100, "tokens_per_s": 10, "default_completion_tokens": 11}}]},
                {"name": "frontier", "role": "frontier", "versions": [{"name": "v1", "engine": {"kind": "remote_openai", "base_url": "http://x/v1", "model": "m"}}]},
            ]
        }
    )
    assert cfg.general.current.latency_prior_ms == pytest.approx(1100.0)
    assert cfg.frontier.current.where == "external" and cfg.frontier.current.latency_prior_ms == 3000.0


# --- the gate --------------------------------------------------------------------------

G = GateConfig()


@pytest.mark.parametrize(
    ("logprobs", "tokens", "finished", "low", "expected"),
    [
        ([0.0] * 8, 8, True, 1.0, 1.0),
        ([math.log(0.5)] * 8, 8, True, 0.5, 0.5),
        ([0.0] * 9 + [math.log(0.01)], 10, True, None, None),  # one bad token pulls the low quantile down
        ([0.0, 0.0], 2, True, 1.0, 0.5),  # a two-token answer scaled by 2/4
        ([0.0, 0.0], 2, False, 1.0, 1.0),  # a prefix is not scaled for length
        ([], 5, True, None, 0.0),  # no logprobs: the gate cannot vouch
    ],
)
def test_gate_score(logprobs, tokens, finished, low, expected) -> None:
    f = gate.features(logprobs, tokens, q=G.quantile, finished=finished)
    if low is not None:
        assert f.low_prob == pytest.approx(low)
    if expected is not None:
        assert gate.score(f, G) == pytest.approx(expected)


def test_low_quantile_beats_the_mean_on_one_bad_token() -> None:
    logprobs = [0.0] * 9 + [math.log(0.01)]
    f = gate.features(logprobs, 10, q=0.0)
    only_mean = GateConfig(mean_weight=1.0, low_weight=0.0)
    assert gate.score(f, only_mean) > 0.6 and gate.score(f, GateConfig(mean_weight=0, low_weight=1)) == pytest.approx(0.01)


def test_quantile() -> None:
    assert gate.quantile([0.1, 0.2, 0.3, 0.4, 0.5], 0.0) == 0.1
    assert gate.quantile([0.1, 0.2, 0.3, 0.4, 0.5], 0.5) == 0.3
    assert gate.quantile([0.0, 1.0], 0.1) == pytest.approx(0.1)


SCORED = [(0.1, False), (0.2, False), (0.3, True), (0.4, False), (0.6, True), (0.7, True), (0.8, True), (0.9, True), (0.95, True), (0.99, True)]


@pytest.mark.parametrize(
    ("rate", "quality", "bar", "escalation", "passing_quality"),
    [
        (0.3, None, 0.35, 0.3, 6 / 7),
        (0.0, None, 0.0, 0.0, 0.7),
        (1.0, None, None, 1.0, 1.0),
        (None, 1.0, 0.6, 0.4, 1.0),
        (None, 0.8, 0.3, 0.2, 7 / 8),
        (None, 0.5, 0.1, 0.0, 0.7),
    ],
)
def test_calibrate(rate, quality, bar, escalation, passing_quality) -> None:
    result = gate.calibrate(SCORED, target_escalation_rate=rate, target_quality=quality)
    if bar is not None:
        assert result.bar == pytest.approx(bar)
    assert result.escalation_rate == pytest.approx(escalation)
    assert result.quality == pytest.approx(passing_quality)


def test_calibrate_needs_one_target_and_records() -> None:
    with pytest.raises(InvalidRequestError):
        gate.calibrate(SCORED)
    with pytest.raises(InvalidRequestError):
        gate.calibrate([], target_quality=0.9)
    with pytest.raises(InvalidRequestError, match="f.jsonl:3: bad features"):
        gate.record_features({"features": {"tokens": "x"}, "correct": True}, "f.jsonl:3")


# --- policy ----------------------------------------------------------------------------

EMAIL_MSG = (ChatMessage("user", "mail bob@example.com the patch"),)
PLAIN_MSG = (ChatMessage("user", "write a sort function"),)


@pytest.mark.parametrize(
    ("mode", "messages", "declared", "cls", "types", "external_text"),
    [
        ("detect", PLAIN_MSG, "public", "public", (), "write a sort function"),
        ("detect", EMAIL_MSG, "public", "restricted", ("EMAIL",), None),
        ("redact", EMAIL_MSG, "public", "public", ("EMAIL",), "mail [EMAIL] the patch"),
        ("redact", EMAIL_MSG, "internal", "internal", ("EMAIL",), "mail [EMAIL] the patch"),
        ("off", EMAIL_MSG, "public", "public", (), "mail bob@example.com the patch"),
    ],
)
def test_screen(mode, messages, declared, cls, types, external_text) -> None:
    s = policy.screen(messages, declared, PolicyConfig(pii=mode))
    assert (s.data_class, s.pii_types) == (cls, types)
    if external_text is None:
        assert s.external_messages is None
    else:
        assert s.external_messages[0].content == external_text


def test_block_mode_refuses() -> None:
    with pytest.raises(PIIDetectedError) as err:
        policy.screen(EMAIL_MSG, "public", PolicyConfig(pii="block"))
    assert err.value.http_status == 400 and err.value.code == "pii_detected" and "bob@" not in err.value.message


@pytest.mark.parametrize(
    ("cls", "allowed_classes", "model", "version", "ok"),
    [
        ("public", ("public",), "frontier", "v1", True),
        ("internal", ("public",), "frontier", "v1", False),
        ("internal", ("public", "internal"), "frontier", "v1", True),
        ("restricted", ("public", "internal", "restricted"), "code", "ext", True),
        ("restricted", ("public",), "code", "v1", True),  # on-prem takes anything
        ("restricted", ("public",), "code", "ext", False),
    ],
)
def test_allowed(cls, allowed_classes, model, version, ok) -> None:
    cfg = make_config(policy={"external_allowed": list(allowed_classes)})
    screened = policy.Screened(cls, (), ())
    assert policy.allowed(cfg, screened, model, version) is ok
    if not ok:
        with pytest.raises(PolicyViolationError) as err:
            policy.check_named(cfg, screened, model, version)
        assert err.value.http_status == 403 and err.value.code == "data_policy_violation"


@pytest.mark.parametrize(("header", "expected"), [(None, "public"), ("Internal", "internal"), ("restricted", "restricted")])
def test_parse_data_class(header, expected) -> None:
    assert policy.parse_data_class(header, PolicyConfig()) == expected


# --- cost ------------------------------------------------------------------------------


def test_costs() -> None:
    cfg = make_config(
        models=[
            {"name": "general", "role": "general", "versions": [_v(cost={"usd_per_million_input_tokens": 1, "usd_per_million_output_tokens": 2, "joules_per_token": 0.5})]},
            {"name": "frontier", "role": "frontier", "versions": [_v(cost={"usd_per_million_input_tokens": 10, "usd_per_million_output_tokens": 30, "joules_per_token": 4})]},
        ]
    )
    calls = [
        costing.CallRecord("general", "v1", 100, 50, costing.LOST, 0.5),
        costing.CallRecord("frontier", "v1", 100, 20, costing.CANCELLED, 0.5, usage_exact=False),
    ]
    spent = costing.total(cfg, calls)
    assert spent.usd == pytest.approx((100 * 1 + 50 * 2 + 100 * 10 + 20 * 30) / 1e6)
    assert spent.joules == pytest.approx(50 * 0.5 + 20 * 4)
    alone = costing.frontier_only(cfg, 100, 50)
    assert alone.usd == pytest.approx((100 * 10 + 50 * 30) / 1e6) and alone.joules == 200
    assert costing.estimate_tokens("abcdefgh") == 2 and costing.estimate_tokens("") == 1


# --- slmctl gate calibrate ---------------------------------------------------------------


def test_slmctl_gate_calibrate(tmp_path, capsys) -> None:
    import json

    from cluster.cli.main import main

    data = tmp_path / "answers.jsonl"
    records = []
    for i in range(100):  # sure answers are right, unsure ones mostly wrong
        sure = i % 4 != 0
        feats = gate.features([-0.05] * 20 if sure else [-1.0] * 20, 20, q=0.1)
        records.append({"features": feats.as_dict(), "correct": sure or i % 8 == 0})
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["gate", "calibrate", "--data", str(data), "--target-escalation-rate", "0.25", "--json", "--profile", "sim"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["records"] == 100 and result["escalation_rate"] == pytest.approx(0.25) and result["quality"] == 1.0
    assert main(["gate", "calibrate", "--data", str(data), "--target-quality", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "pass bar:" in out and "pass_bar:" in out
    data.write_text('{"features": {"tokens": 3}, "correct": "yes"}\n')
    assert main(["gate", "calibrate", "--data", str(data), "--target-quality", "0.9"]) == 2
    assert "answers.jsonl:1: need" in capsys.readouterr().err
    assert main(["gate", "calibrate", "--data", str(tmp_path / "none.jsonl"), "--target-quality", "0.9"]) == 2
    assert main(["gate", "calibrate", "--data", str(data), "--target-escalation-rate", "1.5"]) == 2
