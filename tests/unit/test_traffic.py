"""Traffic splits: validation, range order and sticky choice."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cluster import traffic
from cluster.errors import InvalidRequestError
from cluster.loader import config_from_dict

CFG = config_from_dict(
    {
        "models": [
            {
                "name": "code",
                "role": "specialist",
                "domains": ["code"],
                "current_version": "v1",
                "versions": [{"name": n, "engine": {"kind": "fake"}} for n in ("v1", "v2", "v3")],
            },
            {"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]},
        ]
    }
)
CODE = CFG.model("code")


@pytest.mark.parametrize(
    ("weights", "expected"),
    [({"v1": 90, "v2": 10}, {"v1": 90, "v2": 10, "v3": 0}), ({"v3": 100}, {"v1": 0, "v2": 0, "v3": 100}), ({"v1": 50.0, "v2": 50}, {"v1": 50, "v2": 50, "v3": 0})],
)
def test_validate(weights, expected) -> None:
    assert traffic.validate(CODE, weights) == expected


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        ({"v1": 90, "v9": 10}, "code has no version v9"),
        ({"v1": 90, "v2": 5}, "must sum to 100, got 95"),
        ({"v1": 110, "v2": -10}, "whole number from 0 to 100"),
        ({"v1": 99.5, "v2": 0.5}, "whole number"),
        ({"v1": "90", "v2": 10}, "whole number"),
        ({"v1": True, "v2": 99}, "whole number"),
    ],
)
def test_validate_refuses_with_one_line(weights, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        traffic.validate(CODE, weights)
    assert fragment in err.value.message and "\n" not in err.value.message


def test_default_split_and_order() -> None:
    assert traffic.default_split(CODE) == {"v1": 100, "v2": 0, "v3": 0}
    assert traffic.ordered(CODE, {"v1": 80, "v2": 20}) == [("v2", 20), ("v3", 0), ("v1", 80)]
    assert traffic.ordered(CODE, {"v2": 70, "v3": 30}, stable="v2") == [("v1", 0), ("v3", 30), ("v2", 70)]


def test_sticky_keys_hold_and_stay_on_the_candidate_as_it_grows() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    previous: dict[str, str] = {}
    for weight in (0, 10, 25, 50, 100):
        ranges = traffic.ordered(CODE, {"v1": 100 - weight, "v2": weight})
        now = {k: traffic.pick(ranges, "code", k) for k in keys}
        # the same weights give the same answer every time
        assert now == {k: traffic.pick(ranges, "code", k) for k in keys}
        # every key that was on the candidate stays there as its weight grows
        assert all(now[k] == "v2" for k, v in previous.items() if v == "v2")
        share = Counter(now.values())["v2"] / len(keys)
        assert abs(share - weight / 100) < 0.03
        previous = now


def test_keys_land_differently_per_model() -> None:
    ranges = [("v2", 50), ("v1", 50)]
    keys = [f"u{i}" for i in range(500)]
    same = sum(traffic.pick(ranges, "code", k) == traffic.pick(ranges, "math", k) for k in keys)
    assert 150 < same < 350  # independent halves, not the same users every time


def test_no_key_spreads_by_weight() -> None:
    rng = random.Random(1)
    ranges = [("v2", 30), ("v1", 70)]
    share = Counter(traffic.pick(ranges, "code", None, rng) for _ in range(5000))["v2"] / 5000
    assert abs(share - 0.3) < 0.03


@pytest.mark.parametrize(("user", "session", "key"), [("alice", "s1", "alice"), (None, "s1", "s1"), (None, None, None), ("", "", None)])
def test_request_key(user, session, key) -> None:
    assert traffic.request_key(user, session) == key
