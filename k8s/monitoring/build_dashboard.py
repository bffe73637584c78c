"""Writes grafana-dashboard.json beside this file: `python k8s/monitoring/build_dashboard.py`.

Plain dicts, no SDK. Every query uses the names Ray's metrics agent exports (our metrics
with its ``ray_`` prefix: ``cluster/metric_names.py``), and
``tests/unit/test_metrics_dashboard.py`` checks that each names a metric the code emits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grafana-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid: int, title: str, targets: list[tuple[str, str]], x: int, y: int, *, unit: str = "short",
          kind: str = "timeseries", w: int = 12, h: int = 8) -> dict[str, Any]:
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
        "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[$__rate_interval])))", f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.95, 0.99)
    ]


def dashboard() -> dict[str, Any]:
    r = "[$__rate_interval]"
    panels = [
        panel(1, "Requests per second by model and version",
              [(f"sum by (model, version) (rate(ray_slm_requests_total{r}))", "{{model}}@{{version}}")], 0, 0, unit="reqps"),
        panel(2, "Requests per second by status class and strategy",
              [(f"sum by (status_class, strategy) (rate(ray_slm_requests_total{r}))", "{{status_class}} {{strategy}}")],
              12, 0, unit="reqps"),
        panel(3, "Time to first token (p50 / p95 / p99)", quantiles("ray_slm_time_to_first_token_seconds", "model"), 0, 8, unit="s"),
        panel(4, "Request latency (p50 / p95 / p99)", quantiles("ray_slm_request_duration_seconds", "model"), 12, 8, unit="s"),
        panel(5, "Inter-token latency (p50 / p95)", quantiles("ray_slm_inter_token_latency_seconds", "model")[:2], 0, 16, unit="s"),
        panel(6, "Tokens per second by direction",
              [(f"sum by (model, direction) (rate(ray_slm_tokens_total{r}))", "{{model}} {{direction}}")], 12, 16),
        panel(7, "Escalation rate (share of requests)",
              [(f"sum by (strategy) (rate(ray_slm_escalations_total{{escalated=\"true\"}}{r})) / "
                f"sum by (strategy) (rate(ray_slm_requests_total{r}))", "{{strategy}}")], 0, 24, unit="percentunit"),
        panel(8, "Race wins (share won by the small model)",
              [(f"sum(rate(ray_slm_race_wins_total{{winner=\"small\"}}{r})) / sum(rate(ray_slm_race_wins_total{r}))", "small"),
               (f"sum by (winner) (rate(ray_slm_race_wins_total{r}))", "{{winner}} /s")], 12, 24, unit="percentunit"),
        panel(9, "Cancelled and retried calls per second",
              [(f"sum by (model, strategy) (rate(ray_slm_cancelled_calls_total{r}))", "{{model}} {{strategy}}"),
               (f"sum by (model) (rate(ray_slm_retried_calls_total{r}))", "{{model}} retried")], 0, 32),
        panel(10, "Quality gate score (p10 / p50)",
              [(f"histogram_quantile({q}, sum by (le, model) (rate(ray_slm_gate_score_bucket{r})))", f"p{int(q * 100)} {{{{model}}}}")
               for q in (0.1, 0.5)], 12, 32),
        panel(11, "Canary traffic weights", [("max by (model, version) (ray_slm_traffic_weight)", "{{model}}@{{version}}")],
              0, 40, unit="percentunit"),
        panel(12, "Cost per hour: ensemble against frontier-only",
              [(f"sum(rate(ray_slm_cost_usd_total{r})) * 3600", "ensemble USD/h"),
               (f"sum(rate(ray_slm_frontier_counterfactual_usd_total{r})) * 3600", "frontier-only USD/h")], 12, 40, unit="currencyUSD"),
        panel(13, "Saving against frontier-only",
              [("1 - sum(increase(ray_slm_cost_usd_total[$__range])) / sum(increase(ray_slm_frontier_counterfactual_usd_total[$__range]))",
                "saving")], 0, 48, unit="percentunit", kind="stat", w=6),
        panel(14, "Energy (watts) by model",
              [(f"sum by (model) (rate(ray_slm_energy_joules_total{r}))", "{{model}}")], 6, 48, unit="watt", w=6),
        panel(15, "Healthy replicas per deployment",
              [("sum by (application, deployment) (ray_serve_deployment_replica_healthy)", "{{application}} {{deployment}}")],
              12, 48),
        panel(16, "Router batch latency (p50 / p95) and mean batch size",
              [*quantiles("ray_slm_router_batch_duration_seconds", "application")[:2],
               (f"sum(rate(ray_slm_router_batch_size_sum{r})) / sum(rate(ray_slm_router_batch_size_count{r}))", "mean batch")],
              0, 56, w=24),
    ]
    return {
        "title": "slm-cluster",
        "uid": "slm-cluster",
        "tags": ["slm-cluster", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
