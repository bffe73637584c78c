"""Load a cluster config from a file, a profile name or a dict, with every error named.

A ``ConfigError`` lists each problem as (field path, reason), e.g.
``models[0].versions[1].autoscaling: need min_replicas <= ...``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.config import ClusterConfig, CrossFieldIssues
from cluster.errors import ConfigError

PROFILES = ("local", "gpu", "sim")


def format_loc(loc: tuple[Any, ...]) -> str:
    """pydantic's ``('models', 0, 'versions', 1, 'engine', 'hf', 'device')`` -> ``models[0].versions[1].engine.device``.

    Discriminated unions add the tag as a path element; it is dropped, since it is not a
    key the user wrote.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("hf", "vllm", "sglang", "remote_openai", "fake") and out.endswith("engine"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def issues_from_validation(err: ValidationError) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    errors = err.errors(include_url=False)
    locs = [tuple(e["loc"]) for e in errors]
    for e in errors:
        loc = tuple(e["loc"])
        # A sequence whose only item failed is also reported "too short"; the item's own
        # error says more, so the echo is dropped.
        if e["type"] == "too_short" and any(other[: len(loc)] == loc and len(other) > len(loc) for other in locs):
            continue
        inner = (e.get("ctx") or {}).get("error")
        prefix = format_loc(loc)
        if isinstance(inner, CrossFieldIssues):
            for path, reason in inner.issues:
                issues.append((f"{prefix}.{path}" if prefix else path, reason))
            continue
        message = e["msg"].removeprefix("Value error, ")
        issues.append((prefix, message))
    return issues


def config_from_dict(data: Any, *, source: str = "<dict>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError("a cluster config must be a mapping", issues=(("", "expected a mapping at the top level"),), source=source)
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as err:
        issues = tuple(issues_from_validation(err))
        raise ConfigError(f"{len(issues)} problem(s) in the cluster config", issues=issues, source=source) from None


def parse_text(text: str, *, source: str) -> Any:
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError("not valid YAML/JSON", issues=(("", f"cannot parse: {err}"),), source=source) from None


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("no such file", issues=(("", f"no such file: {p}"),), source=str(p))
    return config_from_dict(parse_text(p.read_text(encoding="utf-8"), source=str(p)), source=str(p))


def profile_text(name: str) -> str:
    if name not in PROFILES:
        raise ConfigError("unknown profile", issues=(("", f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}"),))
    return resources.files("cluster.profiles").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def load_profile(name: str) -> ClusterConfig:
    source = f"profile:{name}"
    return config_from_dict(parse_text(profile_text(name), source=source), source=source)


def resolve_config(*, profile: str | None = None, path: str | None = None, inline: dict[str, Any] | None = None) -> ClusterConfig:
    """Exactly one of profile, path or inline; the same rule for the CLI and ``build_app`` args."""
    given = [x for x in (profile, path, inline) if x is not None]
    if len(given) > 1:
        raise ConfigError("give one of profile, config_path or config", issues=(("", "give one of profile, config_path or config"),))
    if inline is not None:
        return config_from_dict(inline, source="<inline config>")
    if path is not None:
        return load_config(path)
    return load_profile(profile or "local")
