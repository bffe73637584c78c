from __future__ import annotations

import pytest

from cluster.errors import ModelNotFoundError
from cluster.loader import load_profile
from cluster.routing import decide_auto, listed_models, resolve_explicit
from cluster.types import RouteScores

CFG = load_profile("local")


def scores(domain: str, p: float, esc: float = 0.3) -> RouteScores:
    rest = (1 - p) / 5
    probs = {d: (p if d == domain else rest) for d in ("code", "math", "legal", "medical", "finance", "general")}
    return RouteScores(domain=domain, domain_probs=probs, escalation_score=esc)


@pytest.mark.parametrize(
    ("requested", "model", "version", "reason"),
    [("code", "code", "v1", "named"), ("code@v2", "code", "v2", "pinned"), ("math", "math", "v1", "named"), ("frontier@v1", "frontier", "v1", "pinned")],
)
def test_explicit(requested: str, model: str, version: str, reason: str) -> None:
    d = resolve_explicit(CFG, requested)
    assert (d.model, d.version, d.reason) == (model, version, reason)
    assert d.deployment_name == f"{model}-{version}" and d.served_name == f"{model}@{version}"


@pytest.mark.parametrize("requested", ["nope", "code@v3", "code@", "@v1", "auto@v1"])
def test_unknown_is_model_not_found(requested: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_explicit(CFG, requested)
    assert info.value.http_status == 404 and info.value.param == "model"


@pytest.mark.parametrize(
    ("domain", "p", "model", "reason"),
    [
        ("code", 0.9, "code", "domain:code"),
        ("math", 0.5, "math", "domain:math"),  # exactly the bar clears it
        ("math", 0.49, "general", "general:low-confidence-math"),
        ("legal", 0.95, "general", "general:no-specialist-for-legal"),
        ("general", 0.9, "general", "general:no-specialist-for-general"),
    ],
)
def test_auto(domain: str, p: float, model: str, reason: str) -> None:
    d = decide_auto(CFG, scores(domain, p, esc=0.42))
    assert (d.model, d.reason) == (model, reason)
    assert d.version == CFG.model(model).current.name
    assert d.escalation_score == 0.42 and d.domain == domain


def test_listed_models() -> None:
    ids = listed_models(CFG)
    assert ids[:4] == ["auto", "code", "code@v1", "code@v2"]
    assert "frontier@v1" in ids and len(ids) == 1 + 4 + 5
