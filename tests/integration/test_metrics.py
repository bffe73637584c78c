"""After traffic through the sim profile, Ray's Prometheus endpoint has every slm metric with
the expected labels and counts (route, cascade and race; streamed and not; an error).

The sim profile runs with the heuristic router (the trained one loads an embedder) and
without three of its five specialists, so that it starts quickly here; answers are short.
"""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from cluster import metric_names as mn
from tests.integration.support import scrape, total

pytestmark = pytest.mark.integration

MAX_TOKENS = 8


def sim_config() -> dict:
    from cluster.loader import profile_text

    data = yaml.safe_load(profile_text("sim"))
    data["models"] = [m for m in data["models"] if m["name"] not in ("legal", "medical", "finance")]
    data["router"] = {"kind": "heuristic", "resources": {"num_cpus": 0.05}}
    return data


def ask(url: str, model: str, strategy: str | None, *, stream: bool = False, content: str = "write a python function") -> httpx.Response:
    headers = {"x-slm-strategy": strategy} if strategy else {}
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, "stream": stream}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    resp.read()
    return resp


def test_every_metric_reaches_the_scrape_with_its_labels_and_counts(metrics_ray: dict) -> None:
    from ray import serve

    from cluster.loader import config_from_dict
    from deployments.app import build_from_config

    serve.run(build_from_config(config_from_dict(sim_config())), name="sim", route_prefix="/")
    url = metrics_ray["base_url"]

    sent = [
        ("route", ask(url, "code", "route")),
        ("route", ask(url, "code", "route", stream=True)),
        ("cascade", ask(url, "code", "cascade", content="write a sorting function")),
        ("cascade", ask(url, "code", "cascade", stream=True, content="fix this python bug")),
        ("race", ask(url, "code", "race", content="explain this regex")),
        ("race", ask(url, "code", "race", stream=True, content="write a unit test")),
    ]
    assert all(r.status_code == 200 for _, r in sent), [r.text for _, r in sent]
    auto = ask(url, "auto", None)  # through the router
    assert auto.status_code == 200
    bad = ask(url, "code", "sideways")  # a 400 before any model runs
    assert bad.status_code == 400

    answered = [(s, r.headers) for s, r in sent]
    escalated = [h for _, h in answered if h["x-slm-escalated"] != "false"]
    gated = [h for _, h in answered if "x-slm-gate-score" in h]
    cancelled = sum(len(h["x-slm-cancelled"].split(",")) for _, h in answered if h.get("x-slm-cancelled"))
    race_winners = [h["x-slm-race-winner"] for s, h in answered if s == "race"]
    answered_by_code = sum(1 for h in [*(h for _, h in answered), auto.headers] if h["x-slm-model"] == "code")

    requests = mn.REQUESTS.exported_name
    deadline = time.monotonic() + 90
    while True:
        series = scrape(metrics_ray["scrape_url"])
        router_seen = total(series, mn.ROUTER_BATCH_SIZE.exported_name + "_count") >= 1
        if (total(series, requests) >= len(sent) + 2 and router_seen) or time.monotonic() > deadline:
            break
        time.sleep(1)

    # every metric is there, with exactly its documented label keys (plus Ray's own tags)
    ray_tags = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId", "deployment", "replica",
                "application", "route", "le"}
    for spec in mn.ALL:
        if spec.name == mn.ESCALATIONS.name and not escalated:
            continue
        if spec.name in (mn.CANCELLED_CALLS.name,) and not cancelled:
            continue
        if spec.name == mn.RETRIED_CALLS.name:
            continue  # no replica dies here; tests/integration/test_faults.py scrapes this one after a kill
        name = spec.series()[0]
        assert series.get(name), f"{name} is not in the scrape"
        for labels, _ in series[name]:
            ours = {k for k in labels if k not in ray_tags and not k.startswith("otel_")}
            assert ours == set(spec.labels), (name, labels)

    # counts: one request each, per strategy and status class
    assert total(series, requests) == len(sent) + 2
    assert total(series, requests, status_class="4xx", model="none") == 1
    for strat, n in (("route", 3), ("cascade", 2), ("race", 2)):  # the auto request runs the default, route
        assert total(series, requests, strategy=strat, status_class="2xx") == n
    assert total(series, requests, model="code", status_class="2xx") == answered_by_code
    assert total(series, requests, route_reason="named", status_class="2xx") == sum(
        1 for h in [*(h for _, h in answered), auto.headers] if h["x-slm-route-reason"] == "named"
    )
    assert total(series, mn.REQUEST_DURATION.exported_name + "_count") == len(sent) + 2
    assert total(series, mn.TTFT.exported_name + "_count") == len(sent) + 1  # every answer
    assert total(series, mn.INTER_TOKEN.exported_name + "_count") == len(sent) + 1

    assert total(series, mn.ESCALATIONS.exported_name) == len(escalated)
    assert total(series, mn.RACE_WINS.exported_name) == 2
    for winner in set(race_winners):
        assert total(series, mn.RACE_WINS.exported_name, model="code", winner=winner) == race_winners.count(winner)
    assert total(series, mn.CANCELLED_CALLS.exported_name) == cancelled
    assert total(series, mn.GATE_SCORE.exported_name + "_count") == len(gated)

    out_tokens = total(series, mn.TOKENS.exported_name, model="code", direction="output")
    assert 0 < out_tokens <= MAX_TOKENS * (len(sent) + 1)
    assert total(series, mn.TOKENS.exported_name, direction="input") > 0
    assert total(series, mn.COST.exported_name) > 0
    assert total(series, mn.ENERGY.exported_name) > 0
    # the frontier-only counterfactual costs more than what the small models spent
    assert total(series, mn.FRONTIER_COUNTERFACTUAL.exported_name) > total(series, mn.COST.exported_name, model="code")

    weights = {(lab["model"], lab["version"]): v for lab, v in series[mn.TRAFFIC_WEIGHT.exported_name]}
    assert weights[("code", "v1")] == 1.0 and weights[("frontier", "v1")] == 1.0
    assert total(series, mn.ROUTER_LATENCY.exported_name + "_count") >= 1
