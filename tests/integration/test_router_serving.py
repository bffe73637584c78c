"""The trained router served by the Router deployment: routing through the gateway, and a
bad artifact failing the deployment at start."""

from __future__ import annotations

import httpx
import pytest

from cluster.loader import config_from_dict
from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def config(name: str, router: dict) -> dict:
    def model(n: str, role: str, domains: list[str]) -> dict:
        return {"name": n, "role": role, "domains": domains,
                "versions": [{"name": "v1", "engine": {"kind": "fake"}, "resources": {"num_cpus": 0.1}}]}

    return {
        "name": name,
        "models": [model("code", "specialist", ["code"]), model("math", "specialist", ["math"]),
                   model("legal", "specialist", ["legal"]), model("general", "general", [])],
        "router": {"resources": {"num_cpus": 0.1}, **router},
        "gateway": {"resources": {"num_cpus": 0.1}},
    }


def test_a_missing_artifact_fails_the_deployment_at_start(ray_local: dict, tmp_path) -> None:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    bad = config_from_dict(config("badrouter", {"kind": "trained", "artifact_path": str(tmp_path / "missing")}))
    with pytest.raises(RuntimeError, match="Deploying application badrouter failed"):
        serve.run(build_from_config(bad), name="badrouter", route_prefix="/bad")
    # the deployment's status names the cause (slmctl up and status print it)
    message = serve.status().applications["badrouter"].deployments["router"].message
    assert "no such artifact folder" in message and "missing" in message
    serve.delete("badrouter")


FOLLOW_UP = [{"role": "user", "content": "Write a Python function that parses a CSV file into a list of dicts."},
             {"role": "assistant", "content": "def parse(path): ..."},
             {"role": "user", "content": "now make it faster please"}]


@pytest.mark.parametrize(
    ("messages", "model"),
    [
        ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell?", "math"),
        ("Write a Python function that implements binary search on a sorted list.", "code"),
        ("A landowner sued a neighbor for trespass after the neighbor built a fence on the disputed strip. Will the court find the neighbor liable?", "legal"),
        # chat prompts the exam-trained router sent to math or general
        ("fix this python bug: my loop never ends", "code"),
        ("write a SQL query to get the top 5 customers by total order value", "code"),
        ("Is it legal for my employer to read my emails?", "legal"),
        # a follow-up routed by the conversation it belongs to
        (FOLLOW_UP, "code"),
    ],
)
def test_trained_router_routes_auto(ray_local: dict, messages: str | list, model: str) -> None:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    if "trained" not in serve.status().applications:
        serve.run(build_from_config(config_from_dict(config("trained", {"kind": "trained"}))), name="trained", route_prefix="/t")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    resp = httpx.post(f"{ray_local['base_url']}/t/v1/chat/completions", timeout=60,
                      json={"model": "auto", "messages": messages, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-slm-model"] == model and resp.headers["x-slm-route-reason"] == f"domain:{model}"
    assert 0 < float(resp.headers["x-slm-escalation-score"]) < 1
    assert 0 < float(resp.headers["x-slm-escalation-threshold"]) < 1


def test_requests_that_queue_while_the_router_is_busy_share_one_model_call(ray_local: dict) -> None:  # noqa: F811
    import asyncio
    import time

    from ray import serve

    from cluster.config import RouterConfig
    from deployments.busy_merge import BusyMerger
    from deployments.router import Router

    class SlowRouter(Router):
        """The heuristic router made slow (50 ms a call), like an embedder pass on a busy CPU."""

        def __init__(self, config: RouterConfig) -> None:
            super().__init__(config)
            score = self.model.score

            def slow(texts: list[str]) -> list:
                time.sleep(0.05)
                return score(texts)

            self.merger = BusyMerger(slow, max_items=config.max_batch_size)

    cfg = RouterConfig(kind="heuristic", resources={"num_cpus": 0.1}, max_batch_size=32)
    handle = serve.run(serve.deployment(SlowRouter).options(name="router", max_ongoing_requests=64).bind(cfg),
                       name="slowrouter", route_prefix=None)
    prompts = [f"Write a Python function number {i} that sorts a list." for i in range(32)]

    async def client(prompt: str) -> list:  # a closed loop: the next request when the last returns
        return [await handle.route.remote(prompt) for _ in range(4)]

    async def load() -> list:
        return await asyncio.gather(*(client(p) for p in prompts))

    scores = [s for per_client in asyncio.run(load()) for s in per_client]
    assert [s.domain for s in scores] == ["code"] * 128
    stats = handle.batch_stats.remote().result()
    # Serve alone forms a batch every 2 ms while a call takes 50 ms, so under steady load
    # its batches stay small; merged, 32 clients need two or three calls per round.
    assert stats["items"] == 128 and stats["calls"] <= 16, stats  # unmerged: about 40
    serve.delete("slowrouter")
