"""Load a cluster config from a file, a profile name or a dict, with every error named.

A ``ConfigError`` lists each problem as (field path, reason), e.g.
``models[code].versions[v2].autoscaling: need min_replicas <= ...``: list items that carry
a unique ``name`` are named by it, others by their position. Every violation is listed:
field errors, and the cross-field rules run on a best-effort repair of the config
(``cluster.config_repair``), so that a typo does not hide, say, a second general model.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.config import ClusterConfig, CrossFieldIssues
from cluster.config_repair import cross_field_after_repair, did_you_mean, format_loc, named_path
from cluster.errors import ConfigError

PROFILES = ("local", "gpu", "sim")
__all__ = ["PROFILES", "config_from_dict", "format_loc", "load_config", "load_profile", "resolve_config"]


def issues_from_validation(err: ValidationError, data: Any = None) -> list[tuple[str, str]]:
    """(path, reason) per error; with the validated ``data``, unknown keys get a "did you
    mean" hint and list items are named (``models[code]``)."""
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
        if e["type"] == "extra_forbidden" and loc:
            message += did_you_mean(loc)
        issues.append((prefix, message))
    if data is not None:
        issues = [(named_path(path, data), reason) for path, reason in issues]
    return issues


def config_from_dict(data: Any, *, source: str = "<dict>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError("a cluster config must be a mapping", issues=(("", "expected a mapping at the top level"),), source=source)
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as err:
        issues = issues_from_validation(err, data)
        issues += [i for i in cross_field_after_repair(data, err) if i not in issues]
        raise ConfigError(f"{len(issues)} problem(s) in the cluster config", issues=tuple(issues), source=source) from None


def parse_text(text: str, *, source: str) -> Any:
    try:
        if source.endswith(".json"):
            return json.loads(text)
        # A named stream, so that syntax errors say `in "FILE", line 3` (a plain string
        # would be `"<unicode string>"`).
        stream = io.StringIO(text)
        stream.name = source  # type: ignore[misc]
        return yaml.safe_load(stream)
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
