"""Autoscaling on Serve with fake engines and the LLM-aware policy (short delays):
a load spike scales a deployment up and back down; a specialist at zero replicas is
covered by the general model and warmed up, then serves its domain again, then goes
back to zero when idle."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import httpx
import pytest

from cluster.loader import config_from_dict
from cluster.routing import COLD_REASON
from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")]

APP = "autoscale"
MATH_PROMPT = "solve the equation 12 * 12 = x"
# Short windows so that the test sees decisions within seconds, not minutes.
FAST = {"policy": "llm", "look_back_period_s": 2, "metrics_interval_s": 0.25}


def _fake(ttft_ms: float = 10, tokens_per_s: float = 200, tokens: int = 8) -> dict[str, Any]:
    return {"kind": "fake", "ttft_ms": ttft_ms, "tokens_per_s": tokens_per_s, "default_completion_tokens": tokens}


CONFIG = {
    "name": APP,
    "models": [
        {
            "name": "code",
            "role": "specialist",
            "domains": ["code"],
            "versions": [{
                "name": "v1",
                # each answer takes about 2 s: 40 tokens at 20 a second
                "engine": _fake(tokens_per_s=20, tokens=40),
                "resources": {"num_cpus": 0.05},
                "autoscaling": {**FAST, "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                "upscale_delay_s": 0.5, "downscale_delay_s": 3},
                "max_ongoing_requests": 4,
            }],
        },
        {
            "name": "math",
            "role": "specialist",
            "domains": ["math"],
            "versions": [{
                "name": "v1",
                "engine": _fake(),
                "resources": {"num_cpus": 0.05},
                "autoscaling": {**FAST, "min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 4},
            }],
        },
        {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": _fake(), "resources": {"num_cpus": 0.05}}]},
    ],
    "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
    "gateway": {"resources": {"num_cpus": 0.05}, "first_token_timeout_s": 30, "request_timeout_s": 60},
}


@pytest.fixture(scope="module")
def base_url(ray_local: dict) -> str:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    serve.run(build_from_config(config_from_dict(CONFIG)), name=APP, route_prefix="/")
    return ray_local["base_url"]


def running(deployment: str) -> int:
    from ray import serve

    return int(serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0))


def wait_for(check: Callable[[], Any], timeout_s: float, step_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step_s)


def policy_lines(deployment: str) -> list[str]:
    """The LLM policy's decisions for ``deployment``, from Serve's controller log (the policy
    logs every change of replica count it decides): proof that it, not Serve's default
    policy, moved the replicas."""
    import glob
    import os

    import ray

    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    lines = []
    for path in glob.glob(os.path.join(logs, "serve", "controller_*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines += [line for line in f if f"llm policy {deployment}:" in line]
    return lines


def ask(client: httpx.Client, model: str, content: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp


def test_a_load_spike_scales_up_and_back_down(base_url: str) -> None:
    assert running("code-v1") == 1
    stop = threading.Event()
    errors: list[str] = []

    def user() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while not stop.is_set():
                try:
                    ask(client, "code", "write a function")
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(repr(exc))
                    return

    # 12 users on 2 s answers: 12 requests in flight against a target of 2 per replica
    users = [threading.Thread(target=user, daemon=True) for _ in range(12)]
    for t in users:
        t.start()
    try:
        peak = wait_for(lambda: running("code-v1") >= 2 and running("code-v1"), timeout_s=30)
    finally:
        stop.set()
        for t in users:
            t.join(timeout=70)
    assert not errors, errors
    assert peak and peak >= 2, "the spike did not scale code-v1 up"
    # idle: after the 3 s down delay (and the 2 s look-back) it goes back to its minimum
    assert wait_for(lambda: running("code-v1") == 1, timeout_s=40), "code-v1 did not scale back down"
    decisions = wait_for(lambda: [x for x in policy_lines("code-v1") if "up:" in x or "down" in x], timeout_s=10)
    assert any("1 -> " in x and "up:requests" in x for x in decisions), decisions
    assert any(" -> 1 replicas" in x and "down" in x for x in decisions), decisions


def test_a_cold_specialist_is_covered_then_serves_again(base_url: str) -> None:
    assert running("math-v1") == 0
    with httpx.Client(base_url=base_url, timeout=60) as client:
        started = time.monotonic()
        resp = ask(client, "auto", MATH_PROMPT)
        covered_s = time.monotonic() - started
        assert resp.headers["x-slm-route-reason"] == COLD_REASON
        assert resp.headers["x-slm-model"] == "general" and resp.headers["x-slm-domain"] == "math"
        assert covered_s < 5, "a covered request must not wait for the cold start"
        # ... and that request woke the specialist up
        assert wait_for(lambda: running("math-v1") == 1, timeout_s=45), "math-v1 was not scaled up from zero"

        def served_by_math() -> bool:
            return ask(client, "auto", MATH_PROMPT).headers["x-slm-route-reason"] == "domain:math"

        assert wait_for(served_by_math, timeout_s=10), "auto math requests did not return to the specialist"
        status = client.get("/v1/slm/traffic").json()["warmth"]
        assert status["watched"] == ["math-v1"] and status["warm_ups"] >= 1
    # idle again: back to zero after its to-zero delay
    assert wait_for(lambda: running("math-v1") == 0, timeout_s=45), "math-v1 did not scale back to zero"


def test_a_named_request_waits_for_its_cold_start(base_url: str) -> None:
    assert wait_for(lambda: running("math-v1") == 0, timeout_s=45)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        resp = ask(client, "math", MATH_PROMPT)
    assert resp.headers["x-slm-model"] == "math" and resp.headers["x-slm-route-reason"] == "named"
