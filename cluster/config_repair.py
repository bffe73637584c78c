"""Best effort for config errors: name list items in paths, hint at misspelt keys, and run
the cross-field rules on a config whose broken parts are removed.

pydantic stops before the cross-field rules (``ClusterConfig._cross_field``) whenever a
field fails, so a typo would hide, say, a second general model. ``cross_field_after_repair``
deletes each failing part (a bad key falls back to its default; an item missing a required
field leaves its list) and validates again, a few rounds at most, until only the
cross-field rules speak. Pure: no I/O.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from cluster.config import ClusterConfig, CrossFieldIssues

_TAGS = ("hf", "vllm", "sglang", "remote_openai", "fake")
_TOKEN = re.compile(r"\[(\d+)\]|([^.\[\]]+)")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # config.Name: an invalid name would only confuse
_DROP = object()


def format_loc(loc: tuple[Any, ...]) -> str:
    """pydantic's ``('models', 0, 'versions', 1, 'engine', 'hf', 'device')`` -> ``models[0].versions[1].engine.device``.

    Discriminated unions add the tag as a path element; it is dropped, since it is not a
    key the user wrote.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS and out.endswith("engine"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def named_path(path: str, data: Any) -> str:
    """``models[1].versions[0].engine`` -> ``models[code].versions[v1].engine`` by the
    names in ``data``; an item without a valid name, or whose name is not unique in its
    list, keeps its position."""
    out, node = "", data
    for index, key in _TOKEN.findall(path):
        if key:
            out += f".{key}" if out else key
            node = node.get(key) if isinstance(node, dict) else None
            continue
        i = int(index)
        item = node[i] if isinstance(node, list) and i < len(node) else None
        name = item.get("name") if isinstance(item, dict) else None
        unique = isinstance(name, str) and bool(_NAME.match(name)) and sum(isinstance(x, dict) and x.get("name") == name for x in node) == 1
        out += f"[{name}]" if unique else f"[{i}]"
        node = item
    return out


# --- "did you mean" -----------------------------------------------------------------------


def did_you_mean(loc: tuple[Any, ...]) -> str:
    """``"; did you mean 'max_replicas'?"`` for an unknown key at ``loc``, or ``""``."""
    fields = _field_names(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _members(tp: Any) -> list[Any]:
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _step(tp: Any, part: Any) -> Any:
    members = [m for m in _members(tp) if m is not type(None)]
    if isinstance(part, int):
        return next((get_args(m)[0] for m in members if get_origin(m) in (tuple, list)), None)
    for m in members:  # a discriminated union's tag picks its member
        if _is_model(m) and len(members) > 1 and "kind" in m.model_fields and get_args(m.model_fields["kind"].annotation) == (part,):
            return m
    for m in members:
        if _is_model(m) and part in m.model_fields:
            return m.model_fields[part].annotation
        if get_origin(m) is dict:
            return get_args(m)[1]
    return None


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    tp: Any = ClusterConfig
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return []
    models = [m for m in _members(tp) if _is_model(m)]
    return list(models[0].model_fields) if len(models) == 1 else []


# --- cross-field rules on a repaired config ------------------------------------------------


def cross_field_after_repair(data: dict[str, Any], err: ValidationError, rounds: int = 8) -> list[tuple[str, str]]:
    """The cross-field violations of ``data`` once its field errors are cut out, with named
    paths; empty when the repaired config has none, or when it cannot be repaired."""
    work, dropped = copy.deepcopy(data), []
    errors = err.errors(include_url=False)
    for _ in range(rounds):
        cross = [(e.get("ctx") or {}).get("error") for e in errors]
        if all(isinstance(c, CrossFieldIssues) for c in cross):
            issues = [(p, r) for c in cross for p, r in c.issues]
            note = f" (not counting {', '.join(dropped)}: see its errors)" if dropped else ""
            return [(named_path(p, work), r + (note if not p.startswith("models[") else "")) for p, r in issues]
        locs = [tuple(e["loc"]) for e in errors]
        for e, c in zip(errors, cross):
            loc = tuple(e["loc"])
            echo = e["type"] == "too_short" and any(o[: len(loc)] == loc and len(o) > len(loc) for o in locs)
            if isinstance(c, CrossFieldIssues) or echo:  # a list "too short" only because its items failed
                continue
            loc = _plain_loc(work, loc)
            target = loc[:-1] if e["type"] == "missing" else loc
            name = named_path(format_loc(target), work)
            if not target or not _mark(work, target):
                return []
            if target[:1] == ("models",) and len(target) == 2:  # a whole model: the counting rules miss it
                dropped.append(name)
        work = _sweep(work)
        try:
            ClusterConfig.model_validate(work)
            return []
        except ValidationError as again:
            errors = again.errors(include_url=False)
    return []


def _plain_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without the union tags pydantic adds, so that it walks ``data``."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(out)


def _mark(data: Any, loc: tuple[Any, ...]) -> bool:
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    last = loc[-1]
    if isinstance(node, dict) and last in node or isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = _DROP
        return True
    return False


def _sweep(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _sweep(v) for k, v in node.items() if v is not _DROP}
    if isinstance(node, list):
        return [_sweep(v) for v in node if v is not _DROP]
    return node
