"""Pure routing decisions: which model version serves a request, and why.

No I/O and no clock: the gateway calls these with the router's output and the config, so
every branch is a row in a table test.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

from cluster import capabilities, traffic
from cluster.config import ClusterConfig
from cluster.errors import ModelNotFoundError
from cluster.types import RouteDecision, RouteScores, deployment_name

AUTO = "auto"


def resolve_explicit(cfg: ClusterConfig, requested: str) -> RouteDecision:
    """``code`` -> code's current version; ``code@v2`` -> that version; else ModelNotFoundError."""
    name, sep, version = requested.partition("@")
    model = cfg.model(name)
    if model is None:
        raise ModelNotFoundError(f"The model {requested!r} does not exist. Try GET /v1/models.", param="model")
    if not sep:
        return RouteDecision(model=model.name, version=model.current.name, reason="named")
    if model.version(version) is None:
        known = ", ".join(f"{model.name}@{v.name}" for v in model.versions)
        raise ModelNotFoundError(f"The model version {requested!r} does not exist; known versions: {known}.", param="model")
    return RouteDecision(model=model.name, version=version, reason="pinned")


def decide_auto(cfg: ClusterConfig, scores: RouteScores) -> RouteDecision:
    """The specialist of the predicted domain when its probability clears the bar, else general.

    The escalation score and threshold ride along for the cascade and race strategies.
    """
    # The config's threshold overrides the one calibrated into the router's artifact.
    threshold = cfg.router.escalation_threshold if cfg.router.escalation_threshold is not None else scores.escalation_threshold
    specialist = cfg.specialist_for(scores.domain)
    confident = scores.confidence >= cfg.router.min_domain_confidence
    if specialist is not None and confident:
        target, reason = specialist, f"domain:{scores.domain}"
    else:
        target = cfg.general
        if specialist is None:
            reason = f"general:no-specialist-for-{scores.domain}"
        else:
            reason = f"general:low-confidence-{scores.domain}"
    return RouteDecision(
        model=target.name,
        version=target.current.name,
        reason=reason,
        domain=scores.domain,
        confidence=round(scores.confidence, 4),
        escalation_score=scores.escalation_score,
        escalation_threshold=threshold,
    )


COLD_REASON = "general:specialist-cold"


def cover_cold(cfg: ClusterConfig, decision: RouteDecision, cold: frozenset[str] | set[str]) -> RouteDecision:
    """An ``auto`` request routed to a specialist deployment with no running replica goes
    to the general model instead (reason ``general:specialist-cold``), so that no request
    waits for a cold start it did not ask for; the caller warms the specialist up.

    ``cold`` holds deployment names (``math-v1``). Named and pinned requests, and routes
    that are not a specialist's domain, are left alone; so is everything when the general
    model is cold too (someone has to start, and the specialist was the router's choice).
    """
    if not decision.reason.startswith("domain:") or decision.deployment_name not in cold:
        return decision
    general = cfg.general
    if deployment_name(general.name, general.current.name) in cold:
        return decision
    return replace(decision, model=general.name, version=general.current.name, reason=COLD_REASON)


def apply_split(
    cfg: ClusterConfig,
    decision: RouteDecision,
    splits: dict[str, dict[str, int]],
    current: dict[str, str],
    key: str | None,
    rng: random.Random | None = None,
) -> RouteDecision:
    """The version a named or routed request really goes to: a promoted current version
    (from the traffic store) replaces the config's, and a traffic split picks among the
    versions (sticky by ``key``). Pinned requests (``code@v2``) are left alone."""
    if decision.reason == "pinned":
        return decision
    model = cfg.model(decision.model)
    if model is None:
        return decision
    stable = current.get(model.name)
    if stable is None or model.version(stable) is None:
        stable = model.current.name
    weights = splits.get(model.name)
    version = stable
    if weights and all(model.version(v) is not None for v in weights) and sum(weights.values()) == traffic.TOTAL:
        version = traffic.pick(traffic.ordered(model, weights, stable=stable), model.name, key, rng)
    return decision if version == decision.version else replace(decision, version=version)


CAPABILITY = "capability"


def route_capable(
    cfg: ClusterConfig,
    decision: RouteDecision,
    needed: tuple[str, ...],
    *,
    auto: bool,
    split: Callable[[RouteDecision], RouteDecision] | None = None,
) -> RouteDecision:
    """A decision whose engine honours every optional parameter in ``needed``
    (``cluster.capabilities.requested``). An ``auto`` pick that cannot falls back to the
    general model, then the frontier (reason ``general:capability`` / ``frontier:capability``);
    a named model that cannot, or an auto request no model can serve, is the 400 naming the
    first parameter the original pick lacks. ``split`` (``apply_split`` with the request's
    traffic snapshot and key) picks the fallback's version as for any request to that
    model; its current version serves when the split's pick cannot honour ``needed``."""
    if not needed or capabilities.capable(cfg, decision, needed):
        return decision
    if auto:
        fallbacks = [(cfg.general, "general")]
        if cfg.frontier is not None:
            fallbacks.append((cfg.frontier, "frontier"))
        for model, role in fallbacks:
            candidate = replace(decision, model=model.name, version=model.current.name, reason=f"{role}:{CAPABILITY}")
            for pick in ([split(candidate)] if split is not None else []) + [candidate]:
                if capabilities.capable(cfg, pick, needed):
                    return pick
    capabilities.check_decision(cfg, decision, needed)
    return decision  # unreachable: check_decision raised


def listed_models(cfg: ClusterConfig) -> list[str]:
    """Every id /v1/models lists: auto, each model, each model@version."""
    ids = [AUTO]
    for model in cfg.models:
        ids.append(model.name)
        ids.extend(f"{model.name}@{v.name}" for v in model.versions)
    return ids
