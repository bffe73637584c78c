"""What slmctl tells the operator: the curl line, the refusal to replace, Ray's token."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cluster.cli.guidance import ray_auth_lines, ready_banner, replace_refusal, running_apps
from cluster.cli.main import build_parser
from cluster.cli.ray_cluster import LocalCluster
from cluster.loader import load_profile


def _curl_line(banner: str) -> str:
    return next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl "))


def test_banner_without_keys_sends_no_authorization() -> None:
    banner = ready_banner(load_profile("sim"), "127.0.0.1", 8000, LocalCluster())
    assert "Authorization" not in banner
    assert "curl -s http://127.0.0.1:8000/v1/chat/completions" in banner


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("keys", "sent"), [("alpha,beta,gamma", "alpha"), ("solo", "solo")])
def test_banner_curl_line_sends_the_first_key_when_bash_runs_it(keys: str, sent: str) -> None:
    cfg = load_profile("sim")
    cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"api_keys_env": "SLM_KEYS"})})
    banner = ready_banner(cfg, "0.0.0.0", 8000, LocalCluster())
    line = _curl_line(banner)
    assert "$$" not in line
    assert '-H "Authorization: Bearer ${SLM_KEYS%%,*}"' in line
    assert "first of the comma-separated keys in $SLM_KEYS" in banner
    # Paste the line into bash, with curl replaced by printf: each argument on its own line.
    shown = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + line.removeprefix("curl ")],
        env={"SLM_KEYS": keys, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert f"Authorization: Bearer {sent}" in shown


def test_banner_on_a_joined_cluster_names_its_address() -> None:
    cluster = LocalCluster.at_address("http://10.0.0.5:8265")
    banner = ready_banner(load_profile("sim"), "0.0.0.0", 8000, cluster)
    assert "http://10.0.0.5:8000/v1" in banner and "slmctl down --address http://10.0.0.5:8265" in banner


DETAILS = {
    "applications": {
        "slm": {"status": "RUNNING", "deployments": {"Gateway": {}, "Router": {}, "code-v1": {}}},
        "slm-control": {"status": "RUNNING", "deployments": {"RolloutController": {}}},
    }
}


def test_running_apps_lists_each_application_and_its_deployments() -> None:
    assert running_apps(DETAILS) == [("slm", ["Gateway", "Router", "code-v1"]), ("slm-control", ["RolloutController"])]
    assert running_apps({"applications": {}}) == [] == running_apps({})


def test_up_refuses_to_replace_what_runs_unless_told() -> None:
    assert replace_refusal({"applications": {}}, replace=False) is None
    assert replace_refusal(DETAILS, replace=True) is None
    text = replace_refusal(DETAILS, replace=False)
    assert text is not None
    assert "slm: 3 deployments (Gateway, Router, code-v1)" in text
    assert "slm-control: 1 deployments (RolloutController)" in text
    assert "--replace" in text and "Nothing was deployed" in text


def test_up_takes_replace_flag() -> None:
    assert build_parser().parse_args(["up", "--profile", "sim", "--replace"]).replace is True
    assert build_parser().parse_args(["up"]).replace is False


def test_ray_auth_lines_say_where_the_token_is_and_what_to_export() -> None:
    assert ray_auth_lines("http://127.0.0.1:8265", "/home/u/.ray/auth_token", required=False) == []
    text = "\n".join(ray_auth_lines("http://127.0.0.1:8265", "/home/u/.ray/auth_token", required=True))
    assert "/home/u/.ray/auth_token" in text
    assert "export RAY_AUTH_MODE=token" in text and "ray get-auth-token" in text
    assert "serve status --address http://127.0.0.1:8265" in text
    missing = "\n".join(ray_auth_lines("http://h:8265", None, required=True))
    assert "not found here" in missing


def test_token_source_follows_rays_own_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert LocalCluster.token_source() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t0\n")
    assert LocalCluster.token_source() == str(tmp_path / ".ray" / "auth_token")
    assert LocalCluster._auth_headers() == {"Authorization": "Bearer t0"}
    other = tmp_path / "tok"
    other.write_text("t1")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert LocalCluster._auth_headers() == {"Authorization": "Bearer t1"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t2")
    assert LocalCluster.token_source() == "$RAY_AUTH_TOKEN"
    assert LocalCluster._auth_headers() == {"Authorization": "Bearer t2"}
