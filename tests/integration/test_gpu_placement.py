"""Four model deployments at num_gpus 0.25 share one (logical) GPU."""

from __future__ import annotations

import httpx
import pytest

from cluster.loader import config_from_dict
from cluster.placement import fit_problems
from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
RAY_INIT = {"num_gpus": 1, "num_cpus": 4}


def quarter_gpu_config(n: int) -> dict:
    def model(name: str, role: str, domains: list[str]) -> dict:
        version = {"name": "v1", "engine": {"kind": "fake"}, "resources": {"num_gpus": 0.25, "num_cpus": 0.1}}
        return {"name": name, "role": role, "domains": domains, "versions": [version]}

    models = [model("code", "specialist", ["code"]), model("math", "specialist", ["math"]), model("general", "general", []), model("frontier", "frontier", [])]
    if n == 5:
        models.append(model("legal", "specialist", ["legal"]))
    return {"name": "gpus", "models": models, "router": {"resources": {"num_cpus": 0.1}}, "gateway": {"resources": {"num_cpus": 0.1}}}


def test_four_quarter_gpu_deployments_share_one_gpu(ray_local: dict) -> None:  # noqa: F811
    import ray
    from ray import serve

    from deployments.app import build_from_config

    cfg = config_from_dict(quarter_gpu_config(4))
    assert fit_problems(cfg, 4, 1) == []
    serve.run(build_from_config(cfg), name="gpus", route_prefix="/")

    ready = httpx.get(f"{ray_local['base_url']}/readyz", timeout=30).json()
    assert ready["ready"] is True
    placed = {d["deployment"]: d["gpu_ids"] for d in ready["deployments"]}
    assert set(placed) == {"code-v1", "math-v1", "general-v1", "frontier-v1"}
    assert all(ids == ["0"] for ids in placed.values()), placed

    status = serve.status().applications["gpus"].deployments
    assert all(status[name].status == "HEALTHY" for name in placed)
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0.0)


def test_a_fifth_quarter_does_not_fit() -> None:
    problems = fit_problems(config_from_dict(quarter_gpu_config(5)), 4, 1)
    assert len(problems) == 1 and problems[0].startswith("GPU:") and "1.25 GPUs" in problems[0]
