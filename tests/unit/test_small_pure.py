"""Deadlines, placement, errors, stop strings, the heuristic router and the CLI's views."""

from __future__ import annotations

import pickle

import pytest

from cluster.cli.report import app_view, progress_line, status_table
from cluster.deadlines import StreamDeadlines
from cluster.errors import (
    ConfigError,
    EngineError,
    EngineTimeoutError,
    EngineUnavailableError,
    InternalError,
    ModelNotFoundError,
    SLMError,
    find_slm_error,
)
from cluster.loader import config_from_dict, load_profile
from cluster.overrides import with_remote_frontier
from cluster.placement import fit_problems, pack_gpus
from cluster.serve_config import IMPORT_PATH, render_serve_config
from deployments.engines.common import StopMatcher
from router_models.heuristic import HeuristicRouter

D = StreamDeadlines(started_at=100.0, request_timeout_s=30, first_token_timeout_s=5, idle_timeout_s=2)


@pytest.mark.parametrize(
    ("now", "last", "wait", "name"),
    [
        (100.0, None, 5.0, "first token"),
        (104.0, None, 1.0, "first token"),
        (106.0, None, -1.0, "first token"),
        (110.0, 109.5, 1.5, "next token"),
        (129.0, 128.9, 1.0, "whole answer"),
        (131.0, 130.9, -1.0, "whole answer"),
    ],
)
def test_deadlines(now: float, last: float | None, wait: float, name: str) -> None:
    got_wait, got_name = D.next_wait(now, last)
    assert got_wait == pytest.approx(wait) and got_name == name


@pytest.mark.parametrize(
    ("fractions", "gpus", "fits"),
    [
        ([0.25] * 4, 1, True),
        ([0.25] * 5, 1, False),
        ([0.5, 0.5, 0.25, 0.25, 0.5], 2, True),
        ([0.6, 0.6], 1, False),
        ([0.6, 0.6], 2, True),
        ([1, 0.5], 1, False),
        ([2, 0.25], 3, True),
        ([2], 1, False),
    ],
)
def test_pack_gpus(fractions: list[float], gpus: int, fits: bool) -> None:
    assert (pack_gpus(fractions, gpus) is not None) == fits


def test_fit_problems_name_cpu_and_gpu() -> None:
    # initial replicas: 0.25+0.15+0.85 GPUs (legal and medical start at zero), two GPUs when packed
    cfg = load_profile("gpu")
    assert fit_problems(cfg, 64, 2) == []
    problems = fit_problems(cfg, 4, 1)
    assert any(p.startswith("CPU:") for p in problems) and any(p.startswith("GPU:") for p in problems)
    assert "general-v1=1x0.85" in problems[1]


def test_errors_pickle_and_unwrap() -> None:
    for err in (EngineError("x", param="p"), ModelNotFoundError("m", param="model"), EngineTimeoutError("t"), ConfigError("c", issues=(("a", "b"),))):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.message == err.message and back.code == err.code
    assert pickle.loads(pickle.dumps(ConfigError("c", issues=(("a", "b"),)))).issues == (("a", "b"),)

    class Wrapper(Exception):  # the shape of Ray's RayTaskError
        def __init__(self, cause: BaseException) -> None:
            self.cause = cause

    inner = EngineUnavailableError("down")
    assert find_slm_error(Wrapper(inner)) is inner
    try:
        try:
            raise inner
        except SLMError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as outer:
        assert find_slm_error(outer) is inner
    assert find_slm_error(ValueError("x")) is None
    assert InternalError("bug").http_status == 500 and not InternalError("bug").retryable
    assert EngineError("x").to_openai() == {"error": {"message": "x", "type": "upstream_error", "param": None, "code": "engine_error"}}


@pytest.mark.parametrize(
    ("stops", "pieces", "out", "hit"),
    [
        ((), ["ab", "cd"], "abcd", False),
        (("END",), ["hello E", "N", "D more"], "hello ", True),
        (("END",), ["hello E", "NX"], "hello ENX", False),
        (("\n\n", "###"), ["a#", "## b"], "a", True),
    ],
)
def test_stop_matcher(stops: tuple[str, ...], pieces: list[str], out: str, hit: bool) -> None:
    m = StopMatcher(stops)
    text, stopped = "", False
    for piece in pieces:
        emitted, stopped = m.feed(piece)
        text += emitted
        if stopped:
            break
    if not stopped:
        text += m.flush()
    assert (text, stopped) == (out, hit)


@pytest.mark.parametrize(
    ("prompt", "domain"),
    [
        ("Write a Python function that parses JSON", "code"),
        ("```js\nconsole.log(1)\n```", "code"),
        ("Solve for x: 3x + 5 = 20", "math"),
        ("What are the symptoms of a heart attack in a patient?", "medical"),
        ("Can my landlord sue me for breaking the lease contract in court?", "legal"),
        ("Should my portfolio hold bonds when the interest rate rises?", "finance"),
        ("Tell me a bedtime story", "general"),
    ],
)
def test_heuristic_router(prompt: str, domain: str) -> None:
    [s] = HeuristicRouter().score([prompt])
    assert s.domain == domain
    assert abs(sum(s.domain_probs.values()) - 1) < 1e-9 and 0 <= s.escalation_score <= 1


def test_heuristic_escalation_grows_with_hard_prompts() -> None:
    easy, hard = HeuristicRouter().score(["hi", "Explain why and prove step by step: " + "analyze the design " * 100])
    assert hard.escalation_score > easy.escalation_score


def test_remote_frontier_override() -> None:
    cfg = with_remote_frontier(load_profile("local"), base_url="http://127.0.0.1:9/v1", model="gpt-x", api_key_env="KEY")
    engine = cfg.frontier.current.engine
    assert engine.kind == "remote_openai" and engine.model == "gpt-x" and engine.api_key_env == "KEY"
    assert cfg.model("code").current.engine.kind == "hf"
    with pytest.raises(ConfigError):
        no_frontier = config_from_dict({"models": [{"name": "g", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}]})
        with_remote_frontier(no_frontier, base_url="x", model="y", api_key_env=None)


def test_serve_config_carries_the_config_inline() -> None:
    cfg = load_profile("sim")
    rendered = render_serve_config(cfg, port=9000)
    [app] = rendered["applications"]  # no Redis named: no rollout controller
    assert app["import_path"] == IMPORT_PATH and rendered["http_options"]["port"] == 9000
    assert config_from_dict(app["args"]["config"]) == cfg


def test_serve_config_adds_the_rollout_controller_when_there_is_a_redis() -> None:
    from cluster.serve_config import CONTROLLER_APP, CONTROLLER_IMPORT_PATH

    cfg = load_profile("sim")
    cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"url": "redis://127.0.0.1:6380/0"})})
    data, control = render_serve_config(cfg)["applications"]
    assert data["import_path"] == IMPORT_PATH and data["route_prefix"] == "/"
    assert (control["name"], control["import_path"], control["route_prefix"]) == (CONTROLLER_APP, CONTROLLER_IMPORT_PATH, None)
    assert config_from_dict(control["args"]["config"]).redis.url == "redis://127.0.0.1:6380/0"


DETAILS = {
    "applications": {
        "slm": {
            "status": "DEPLOYING",
            "message": "",
            "deployments": {
                "slow-v1": {"status": "UPDATING", "target_num_replicas": 1, "replicas": [{"state": "STARTING"}],
                            "message": "Deployment 'slow-v1' has 1 replicas that have taken more than 30s to initialize. "
                                       "This may be caused by a slow __init__ or reconfigure method."},
                "code-v1": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}],
                            "deployment_config": {"ray_actor_options": {"num_gpus": 0.25, "num_cpus": 1}}},
                "math-v1": {"status": "UPDATING", "target_num_replicas": 1, "replicas": [{"state": "PENDING_ALLOCATION"}],
                            "message": "Deployment 'math-v1' has 1 replicas that have taken more than 30s to be scheduled.",
                            "deployment_config": {"ray_actor_options": {"num_gpus": 0.25}}},
            },
        }
    }
}


def test_cli_views() -> None:
    assert app_view(DETAILS, "other") is None
    view = app_view(DETAILS, "slm")
    code, math, slow = view.rows
    assert (code.running, code.target, code.num_gpus) == (1, 1, 0.25)
    assert math.waiting_for_resources and not code.waiting_for_resources
    assert not slow.waiting_for_resources  # a slow model load is not a placement problem
    assert "1/3 deployments healthy" in progress_line(view, 3) and "math-v1 0/1" in progress_line(view, 3)
    table = status_table(view)
    assert "WAITING FOR RESOURCES" in table and "0.25" in table


def test_the_status_names_the_versions_that_run_in_the_gateway() -> None:
    from cluster.cli.report import in_gateway_line
    from cluster.loader import config_from_dict, load_profile

    data = load_profile("sim").model_dump(mode="json")
    assert in_gateway_line(config_from_dict(data)) is None
    frontier = next(m for m in data["models"] if m["role"] == "frontier")
    frontier["versions"][0] = {"name": "v1", "runs_in": "gateway",
                               "engine": {"kind": "remote_openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    line = in_gateway_line(config_from_dict(data))
    assert line is not None and line.endswith(f": {frontier['name']}-v1")
