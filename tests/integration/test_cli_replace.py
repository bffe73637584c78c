"""`slmctl up` over a running application refuses unless --replace, naming what runs;
`slmctl status` says how to reach a Ray with token auth; `slmctl down` says what it stops."""

from __future__ import annotations

import json

import pytest

from tests.integration.slmctl import CLUSTER_FLAGS, UP_FLAGS, down, slmctl

pytestmark = pytest.mark.integration


def _fake(name: str) -> dict:
    return {"name": name, "engine": {"kind": "fake"}, "resources": {"num_cpus": 0.05}}


def _config(name: str) -> dict:
    return {
        "name": name,
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "versions": [_fake("v1")]},
            {"name": "general", "role": "general", "versions": [_fake("v1")]},
        ],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "gateway": {"resources": {"num_cpus": 0.05}},
    }


def test_up_refuses_to_replace_a_running_app_unless_told(tmp_path) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(_config("first")))
    second.write_text(json.dumps(_config("second")))
    down()
    try:
        res = slmctl("up", "--config", str(first), *UP_FLAGS, "--timeout-s", "240", timeout_s=360)
        assert res.code == 0, res.out

        res = slmctl("up", "--config", str(second), *UP_FLAGS, "--timeout-s", "240", timeout_s=360)
        assert res.code == 1, res.out
        assert "already running" in res.out and "Nothing was deployed" in res.out and "--replace" in res.out
        assert "first: " in res.out and "code-v1" in res.out and "general-v1" in res.out

        status = slmctl("status", *CLUSTER_FLAGS, timeout_s=120)
        assert status.code == 0, status.out
        assert "application first: RUNNING" in status.out and "application second:" not in status.out
        # Ray 2.60 asks for a token unless RAY_AUTH_MODE=disabled: status then says where it is.
        if "Ray token auth is on" in status.out:
            assert "RAY_AUTH_MODE=token" in status.out and "serve status --address" in status.out

        res = slmctl("up", "--config", str(second), "--replace", *UP_FLAGS, "--timeout-s", "240", timeout_s=360)
        assert res.code == 0, res.out
        status = slmctl("status", *CLUSTER_FLAGS, timeout_s=120)
        assert "application second: RUNNING" in status.out, status.out
        assert "application first: RUNNING" not in status.out, status.out  # replaced: gone, or DELETING
    finally:
        res = slmctl("down", *CLUSTER_FLAGS, timeout_s=120)
    assert res.code == 0, res.out
    assert "Deleting the Serve applications" in res.out and "second (" in res.out
    assert "Stopping the local Ray that `slmctl up` started" in res.out and "ray stop --force" in res.out
