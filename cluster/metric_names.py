"""The metrics slm-cluster exports: names, descriptions, label keys and histogram buckets,
as data, so that the emitters (``deployments/gateway/metrics.py``, the router) and the
Grafana dashboard (``k8s/monitoring/``) read one list.

Prometheus naming: base units (seconds, joules, USD) and ``_total`` on counters. Labels are
bounded sets only (model, version, strategy, route reason, status class, direction,
winner...): never a user, a session or a request id.

Ray's metrics agent exports every application metric with a ``ray_`` prefix
(``slm_requests_total`` is scraped as ``ray_slm_requests_total``); a counter keeps one
``_total`` (Ray 2.60, OpenTelemetry exporter). ``exported_name`` gives the scraped name,
and the dashboard queries use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.traffic import TOTAL

COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"
EXPORT_PREFIX = "ray_"  # added by Ray's metrics agent to every application metric

# status classes of an answer; "stream_error" never appears: a stream that fails after its
# first byte was a 200 and stays counted as 2xx
STATUS_CLASSES = ("2xx", "4xx", "5xx")
DIRECTIONS = ("input", "output")
RACE_WINNERS = ("small", "frontier")
NONE = "none"  # the label value when a request failed before a model was chosen


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        return EXPORT_PREFIX + self.name

    def series(self) -> tuple[str, ...]:
        """The names this metric appears under in a scrape."""
        base = self.exported_name
        if self.kind == HISTOGRAM:
            return (f"{base}_bucket", f"{base}_count", f"{base}_sum")
        return (base,)


_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FAST_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SCORE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)  # 0.85: the default pass bar
_BATCH = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)

REQUESTS = MetricSpec(
    "slm_requests_total", COUNTER, "Chat completion requests, by who answered and the HTTP status class.",
    ("model", "version", "strategy", "route_reason", "status_class"),
)
REQUEST_DURATION = MetricSpec(
    "slm_request_duration_seconds", HISTOGRAM, "Whole request time at the gateway (streamed: to the stream's end).",
    ("model", "version", "strategy"), _SECONDS,
)
TTFT = MetricSpec(
    "slm_time_to_first_token_seconds", HISTOGRAM,
    "Time from the request's arrival to its first answer token (streamed: the first token the client may get).",
    ("model", "version", "strategy"), _SECONDS,
)
INTER_TOKEN = MetricSpec(
    "slm_inter_token_latency_seconds", HISTOGRAM, "Mean time between the answering call's tokens, one sample a request.",
    ("model", "version"), _FAST_SECONDS,
)
TOKENS = MetricSpec(
    "slm_tokens_total", COUNTER, "Tokens of every model call, cancelled calls included.", ("model", "version", "direction"),
)
ESCALATIONS = MetricSpec(
    "slm_escalations_total", COUNTER,
    "Requests that escalated (true), tried and fell back (failed) or skipped for the budget (skipped-budget).",
    ("model", "strategy", "escalated"),
)
RACE_WINS = MetricSpec("slm_race_wins_total", COUNTER, "Races, by the side that answered.", ("model", "winner"))
CANCELLED_CALLS = MetricSpec(
    "slm_cancelled_calls_total", COUNTER, "Model calls cancelled by the gateway (race or cascade losers).",
    ("model", "version", "strategy"),
)
RETRIED_CALLS = MetricSpec(
    "slm_retried_calls_total", COUNTER,
    "Model calls opened again on another replica because theirs died before the first token (docs/faults.md).",
    ("model", "version"),
)
GATE_SCORE = MetricSpec(
    "slm_gate_score", HISTOGRAM, "The quality gate's last score on a request's small answer.", ("model", "strategy"), _SCORE,
)
TRAFFIC_WEIGHT = MetricSpec(
    "slm_traffic_weight", GAUGE, "The gateway's traffic split: the share of a model's traffic each version gets (0..1).",
    ("model", "version"),
)
COST = MetricSpec("slm_cost_usd_total", COUNTER, "USD spent on model calls, cancelled calls included.", ("model", "version"))
ENERGY = MetricSpec("slm_energy_joules_total", COUNTER, "Joules spent on model calls (output tokens).", ("model", "version"))
FRONTIER_COUNTERFACTUAL = MetricSpec(
    "slm_frontier_counterfactual_usd_total", COUNTER, "What the same answers would have cost on the frontier model alone.",
    ("strategy",),
)
ROUTER_LATENCY = MetricSpec(
    "slm_router_batch_duration_seconds", HISTOGRAM, "Seconds the router model took to score one batch.", (), _FAST_SECONDS,
)
ROUTER_BATCH_SIZE = MetricSpec(
    "slm_router_batch_size", HISTOGRAM, "Route requests the router model scored in one call.", (), _BATCH,
)

GATEWAY_METRICS = (
    REQUESTS, REQUEST_DURATION, TTFT, INTER_TOKEN, TOKENS, ESCALATIONS, RACE_WINS, CANCELLED_CALLS, RETRIED_CALLS,
    GATE_SCORE, TRAFFIC_WEIGHT, COST, ENERGY, FRONTIER_COUNTERFACTUAL,
)
ROUTER_METRICS = (ROUTER_LATENCY, ROUTER_BATCH_SIZE)
ALL = GATEWAY_METRICS + ROUTER_METRICS

# Label keys that may never appear: unbounded values would make one series per request.
FORBIDDEN_LABELS = frozenset({"request_id", "user", "session", "api_key", "prompt", "trace_id"})


def status_class(http_status: int) -> str:
    return f"{http_status // 100}xx"


def exported_names() -> set[str]:
    """Every series name a scrape may show for our metrics."""
    return {s for spec in ALL for s in spec.series()}


def version_weights(
    versions: dict[str, tuple[str, list[str]]], splits: dict[str, dict[str, int]], current: dict[str, str]
) -> dict[tuple[str, str], float]:
    """The share (0..1) of each model's traffic that each version gets, as the gateway's
    split snapshot says (``cluster.routing.apply_split``): a valid split's weights, else all
    of it to the current version (the store's promoted one, else the config's).

    ``versions`` maps each model to (its config's current version, all its versions)."""
    out: dict[tuple[str, str], float] = {}
    for model, (configured, names) in versions.items():
        stable = current.get(model) if current.get(model) in names else configured
        weights = splits.get(model) or {}
        total = sum(weights.values())
        valid = total == TOTAL and all(v in names for v in weights)
        for name in names:
            out[(model, name)] = weights.get(name, 0) / total if valid else float(name == stable)
    return out
