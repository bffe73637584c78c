"""Pure strategy decisions: which strategy a request runs, which models it may reach in
which order, latency budgets, the hedge budget and the live latency estimates.

The gateway executes the plan (``deployments/gateway/ensemble.py``); everything that
decides lives here, so each rule is a row in a table test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cluster import capabilities, policy
from cluster.config import STRATEGIES, ClusterConfig, StrategyConfig
from cluster.errors import CircuitOpenError, InvalidRequestError
from cluster.headers import parse_choice
from cluster.policy import Screened
from cluster.types import RouteDecision

STRATEGY_HEADER = "x-slm-strategy"
BUDGET_HEADER = "x-slm-latency-budget-ms"

# x-slm-escalated values
ESCALATED, NOT_ESCALATED, ESCALATION_FAILED, SKIPPED_BUDGET = "true", "false", "failed", "skipped-budget"


def parse_strategy(header: str | None, cfg: StrategyConfig) -> str:
    return parse_choice(header, default=cfg.default, allowed=STRATEGIES, name=STRATEGY_HEADER, what="strategy")


def parse_budget(header: str | None) -> float | None:
    """The latency budget in milliseconds, or None. A bad value is a 400 naming the header."""
    if header is None:
        return None
    try:
        value = float(header.strip())
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InvalidRequestError(
            f"{BUDGET_HEADER} must be a positive number of milliseconds, got {header!r}.", param=BUDGET_HEADER, code="invalid_header"
        )
    return value


def fits(elapsed_ms: float, expected_ms: float, budget_ms: float | None) -> bool:
    """Whether a step expected to take ``expected_ms`` still fits a budget after ``elapsed_ms``."""
    return budget_ms is None or elapsed_ms + expected_ms <= budget_ms


@dataclass(frozen=True)
class Plan:
    """What the gateway runs for one request.

    ``tiers``: the models in the order they may answer. route runs ``tiers[0]`` alone;
    cascade gates every tier but the last; race runs ``tiers[0]`` against ``tiers[1]``
    (the frontier) when there is one.
    """

    strategy: str
    tiers: tuple[RouteDecision, ...]
    escalated: str = NOT_ESCALATED
    budget_ms: float | None = None
    # why the frontier is not among the tiers although the strategy wanted it
    frontier_skipped: str | None = None  # "policy" | "budget" | "absent" | "breaker" | "capability"


def _decision_for(cfg: ClusterConfig, role_model: str, reason: str) -> RouteDecision:
    model = cfg.model(role_model)
    assert model is not None
    return RouteDecision(model=model.name, version=model.current.name, reason=reason)


def plan(
    cfg: ClusterConfig,
    strategy: str,
    first: RouteDecision,
    *,
    auto: bool,
    screened: Screened,
    budget_ms: float | None,
    expected_ms: dict[str, float],
    frontier_blocked_s: float = 0.0,
    needed: tuple[str, ...] = (),
) -> Plan:
    """The plan for a request whose first choice is ``first`` (the router's pick for auto,
    else the named model). ``expected_ms``: deployment name -> expected latency.

    ``frontier_blocked_s`` > 0: the frontier's circuit breaker refuses calls for that long.
    A request naming the frontier then raises ``CircuitOpenError`` (503, ``Retry-After``);
    one that would escalate keeps its small answer, flagged ``failed`` when it needed the
    frontier (route escalation at once; cascade and race when the gate fails).

    ``needed``: the optional parameters the request uses (``capabilities.requested``); a
    tier whose engine cannot honour them is left out, as one the data may not reach is."""
    frontier_model = cfg.frontier
    frontier = (
        _decision_for(cfg, frontier_model.name, "frontier:escalated")
        if frontier_model is not None
        else None
    )

    def reach(d: RouteDecision) -> bool:
        return policy.allowed(cfg, screened, d.model, d.version) and capabilities.capable(cfg, d, needed)

    def frontier_block(elapsed_ms: float = 0.0) -> str | None:
        if frontier is None:
            return "absent"
        if not reach(frontier):
            return "policy" if capabilities.capable(cfg, frontier, needed) else "capability"
        if frontier_blocked_s > 0:
            return "breaker"
        if not fits(elapsed_ms, expected_ms.get(frontier.deployment_name, 0.0), budget_ms):
            return "budget"
        return None

    # A named frontier (or anything on the frontier's deployment) is answered directly.
    if frontier is not None and first.model == frontier.model and frontier_blocked_s > 0:
        # Any version of the frontier: the breaker is the model's (one upstream).
        raise CircuitOpenError(
            f"The frontier model is failing; its circuit breaker is open. Retry in {math.ceil(frontier_blocked_s)} s.",
            retry_after_s=frontier_blocked_s,
        )
    if frontier is not None and first.deployment_name == frontier.deployment_name:
        return Plan("route" if strategy == "route" else strategy, (first,), budget_ms=budget_ms)

    if strategy == "route":
        if auto and cfg.strategy.escalate and first.escalation_score is not None and first.escalation_threshold is not None:
            if first.escalation_score >= first.escalation_threshold:
                blocked = frontier_block()
                if blocked is None:
                    assert frontier is not None
                    up = replace(
                        frontier,
                        domain=first.domain,
                        confidence=first.confidence,
                        escalation_score=first.escalation_score,
                        escalation_threshold=first.escalation_threshold,
                    )
                    return Plan("route", (up,), escalated=ESCALATED, budget_ms=budget_ms)
                escalated = {"budget": SKIPPED_BUDGET, "breaker": ESCALATION_FAILED}.get(blocked, NOT_ESCALATED)
                return Plan("route", (first,), escalated=escalated, budget_ms=budget_ms, frontier_skipped=blocked)
        return Plan("route", (first,), budget_ms=budget_ms)

    if strategy == "race":
        blocked = frontier_block()
        if blocked is not None:
            return Plan("race", (first,), budget_ms=budget_ms, frontier_skipped=blocked)
        assert frontier is not None
        return Plan("race", (first, frontier), budget_ms=budget_ms)

    # cascade: the configured tiers, each model once, those the data may not reach left out.
    tiers: list[RouteDecision] = []
    skipped: str | None = None
    for tier in cfg.strategy.cascade_tiers:
        if tier == "routed":
            candidate = first
        elif tier == "general":
            candidate = _decision_for(cfg, cfg.general.name, "general:cascade")
        else:
            if frontier is None:
                skipped = "absent"
                continue
            candidate = frontier
        if any(t.deployment_name == candidate.deployment_name for t in tiers):
            continue
        if not reach(candidate):
            if candidate is frontier:
                skipped = skipped or ("policy" if capabilities.capable(cfg, frontier, needed) else "capability")
            continue
        if candidate is frontier and frontier_blocked_s > 0:
            skipped = "breaker"
            continue
        tiers.append(candidate)
    if not tiers or tiers[0].deployment_name != first.deployment_name:
        # The routed model always answers first: the tiers escalate from it.
        tiers.insert(0, first)
    return Plan("cascade", tuple(tiers), budget_ms=budget_ms, frontier_skipped=skipped)


class HedgeBudget:
    """A token bucket over requests, not time: each race adds ``share`` tokens (up to
    ``burst``) and each frontier call it starts takes one, so over any long run at most
    about ``share`` of races hedge. Count-based, so it needs no clock and its tests are exact."""

    def __init__(self, share: float, burst: int) -> None:
        self.share = share
        self.burst = float(burst)
        self.tokens = float(burst) if share > 0 else 0.0

    def offer(self) -> None:
        """One race request arrived."""
        self.tokens = min(self.burst, self.tokens + self.share)

    def take(self) -> bool:
        """Start a frontier call if the bucket allows it."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class LatencyEstimates:
    """Per-deployment expected latency of a whole answer: the config's prior until traffic
    has been seen, then an exponentially weighted moving average of observed latencies."""

    def __init__(self, priors_ms: dict[str, float], alpha: float) -> None:
        self.values = dict(priors_ms)
        self.alpha = alpha
        self.seen: dict[str, int] = {}

    def observe(self, deployment: str, latency_ms: float) -> None:
        if self.seen.get(deployment, 0) == 0 or deployment not in self.values:
            self.values[deployment] = latency_ms
        else:
            self.values[deployment] += self.alpha * (latency_ms - self.values[deployment])
        self.seen[deployment] = self.seen.get(deployment, 0) + 1

    def expected(self, deployment: str) -> float:
        return self.values.get(deployment, 0.0)
