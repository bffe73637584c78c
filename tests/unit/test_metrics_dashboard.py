"""The Grafana dashboard queries only metrics the code emits, and every label set is bounded."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from cluster import metric_names as mn

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"

# Ray's own series the dashboard may use (exported by Ray 2.60's Serve controller).
RAY_ALLOWED = {"ray_serve_deployment_replica_healthy"}

PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool", "clamp_min",
}


def _exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


def metric_names_in(expr: str) -> set[str]:
    """Identifiers that name a series: not inside {...} or "..." or [...], not a function,
    keyword or a label in by (...)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("__")}


def test_the_parser_finds_the_series_names() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(ray_slm_x_bucket{a="b"}[$__rate_interval]))) / sum(ray_y)'
    assert metric_names_in(expr) == {"ray_slm_x_bucket", "ray_y"}


def test_every_dashboard_query_names_a_metric_the_code_emits() -> None:
    exprs = _exprs()
    assert exprs
    emitted = mn.exported_names()
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, expr
        unknown = names - emitted - RAY_ALLOWED
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which nothing emits"


def test_the_dashboard_covers_every_metric() -> None:
    used = set().union(*(metric_names_in(e) for e in _exprs()))
    for spec in mn.ALL:
        assert used & set(spec.series()), f"no panel shows {spec.name}"


def test_the_checked_in_dashboard_is_the_generated_one() -> None:
    spec = importlib.util.spec_from_file_location("build_dashboard", DASHBOARD.with_name("build_dashboard.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text(encoding="utf-8") == module.render(), "run python k8s/monitoring/build_dashboard.py"


def test_queries_group_only_by_declared_labels() -> None:
    declared = {label for spec in mn.ALL for label in spec.labels} | {"le", "application", "deployment"}
    for expr in _exprs():
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",") if g.strip()}
            assert labels <= declared, (expr, labels - declared)


@pytest.mark.parametrize("spec", mn.ALL, ids=lambda s: s.name)
def test_metric_names_and_labels_follow_the_rules(spec: mn.MetricSpec) -> None:
    assert spec.name.startswith("slm_") and re.fullmatch(r"[a-z_]+", spec.name)
    assert not set(spec.labels) & mn.FORBIDDEN_LABELS
    assert len(spec.labels) == len(set(spec.labels)) <= 5
    if spec.kind == mn.COUNTER:
        assert spec.name.endswith("_total")
    else:
        assert not spec.name.endswith("_total")
    if spec.kind == mn.HISTOGRAM:
        assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets
    if "seconds" in spec.name or spec.name.endswith("_usd_total") or spec.name.endswith("_joules_total"):
        assert not re.search(r"_(ms|milliseconds|minutes|cents|kwh)\b", spec.name)


def test_label_values_are_bounded_sets() -> None:
    assert [mn.status_class(s) for s in (200, 404, 503)] == ["2xx", "4xx", "5xx"]
    assert set(mn.STATUS_CLASSES) == {"2xx", "4xx", "5xx"}


def test_version_weights_follow_the_split() -> None:
    versions = {"code": ("v1", ["v1", "v2"]), "general": ("v1", ["v1"])}
    assert mn.version_weights(versions, {}, {}) == {("code", "v1"): 1.0, ("code", "v2"): 0.0, ("general", "v1"): 1.0}
    split = mn.version_weights(versions, {"code": {"v1": 90, "v2": 10}}, {})
    assert split[("code", "v1")] == 0.9 and split[("code", "v2")] == 0.1
    promoted = mn.version_weights(versions, {}, {"code": "v2"})
    assert promoted[("code", "v2")] == 1.0 and promoted[("code", "v1")] == 0.0
    bad = mn.version_weights(versions, {"code": {"v1": 50, "v9": 50}}, {})  # invalid: ignored, as apply_split does
    assert bad[("code", "v1")] == 1.0
