"""A plan that cannot fit is reported clearly by ``slmctl up`` and ``slmctl status``, and never hangs."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.slmctl import CLUSTER_FLAGS, UP_FLAGS, down, slmctl
from tests.integration.test_gpu_placement import quarter_gpu_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_down():
    down()
    yield
    down()


def test_validate_names_file_field_and_reason(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"models": [{"name": "code", "role": "boss", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}]}))
    res = slmctl("validate", str(bad))
    assert res.code == 2
    assert f"{bad}: models[code].role: Input should be 'specialist', 'general' or 'frontier'" in res.out
    good = tmp_path / "good.json"
    good.write_text(json.dumps(quarter_gpu_config(4)))
    assert slmctl("validate", str(good)).code == 0


def test_up_refuses_a_plan_that_does_not_fit_and_status_reports_it(tmp_path, cluster_down) -> None:
    cfg = tmp_path / "five.json"
    cfg.write_text(json.dumps(quarter_gpu_config(5)))

    res = slmctl("up", "--config", str(cfg), "--num-gpus", "1", "--num-cpus", "4", *UP_FLAGS, timeout_s=180)
    assert res.code == 3, res.out
    assert "does not fit" in res.out and "GPU:" in res.out and "Nothing was deployed" in res.out

    # Deployed anyway, Serve waits for a GPU that never comes: up says so and returns.
    started = time.monotonic()
    res = slmctl("up", "--config", str(cfg), "--skip-fit-check", "--timeout-s", "150", *UP_FLAGS, timeout_s=240)
    assert res.code == 3, res.out
    assert "WAITING FOR RESOURCES" in res.out and "does not fit" in res.out
    assert time.monotonic() - started < 150

    res = slmctl("status", *CLUSTER_FLAGS)
    assert res.code == 3, res.out
    assert "DOES NOT FIT: GPU:" in res.out and "WAITING FOR RESOURCES" in res.out
    assert "0.25" in res.out
