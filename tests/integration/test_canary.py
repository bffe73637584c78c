"""Canary rollouts end to end: `slmctl up` (with its embedded Redis and the rollout
controller application), steady user traffic, and `slmctl canary`: a healthy version is
promoted through its steps, a failing one is rolled back, users stick to their version."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.integration.slmctl import API_PORT, CLUSTER_FLAGS, UP_FLAGS, down, slmctl

pytestmark = pytest.mark.integration


def _fake(name: str, **engine: object) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 4, **engine}, "resources": {"num_cpus": 0.05}}


CONFIG = {
    "name": "canary",
    "models": [
        {"name": "code", "role": "specialist", "domains": ["code"], "current_version": "v1",
         "versions": [_fake("v1"), _fake("v2"), _fake("v3", failure_rate=0.3)]},
        {"name": "general", "role": "general", "versions": [_fake("v1")]},
    ],
    "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
    "gateway": {"resources": {"num_cpus": 0.05}},
    "redis": {"poll_interval_s": 0.1},
}


class Traffic:
    """Steady requests from 40 users, about 25 a second, recording who got which version."""

    def __init__(self) -> None:
        self.results: list[tuple[float, str, int, str | None]] = []  # (time, user, status, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=30) as c:
            i = 0
            while not self._stop.is_set():
                user = f"user-{i % 40}"
                body = {"model": "code", "user": user, "messages": [{"role": "user", "content": "write a function"}]}
                try:
                    r = c.post("/v1/chat/completions", json=body)
                    self.results.append((time.monotonic(), user, r.status_code, r.headers.get("x-slm-version")))
                except httpx.HTTPError:
                    self.results.append((time.monotonic(), user, 0, None))
                i += 1
                time.sleep(0.04)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import os

    state = tmp_path_factory.mktemp("state")
    os.environ["SLM_STATE_DIR"] = str(state)  # a fresh embedded Redis for this module
    cfg = tmp_path_factory.mktemp("cfg") / "canary.json"
    cfg.write_text(json.dumps(CONFIG))
    down()
    res = slmctl("up", "--config", str(cfg), *UP_FLAGS, "--timeout-s", "300", timeout_s=420)
    try:
        assert res.code == 0, res.out
        assert "embedded Redis" in res.out
        yield
    finally:
        down()
        os.environ.pop("SLM_STATE_DIR", None)


def status(model: str = "code") -> dict:
    res = slmctl("canary", "status", model, "--json", *CLUSTER_FLAGS, timeout_s=60)
    assert res.code == 0, res.out
    return json.loads(res.out)


def wait_state(states: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = status()["rollouts"].get("code")
        if record and record["state"] in states:
            return record
        time.sleep(1)
    raise AssertionError(f"never reached {states}: {status()}")


def test_bad_input_is_refused_with_one_line(cluster) -> None:
    for args, fragment in [
        (["start", "nope", "--to", "v2"], "unknown model 'nope'"),
        (["start", "code", "--to", "v9"], "no deployed version 'v9'"),
        (["start", "code", "--to", "v2", "--steps", "10,50"], "last step must be 100"),
        (["set", "code", "v1=90", "v2=5"], "must sum to 100"),
        (["set", "code", "v7=100"], "no version v7"),
        (["promote", "code"], "has no rollout"),
    ]:
        res = slmctl("canary", *args, *CLUSTER_FLAGS, timeout_s=60)
        assert res.code != 0 and fragment in res.out, (args, res.out)
        assert len(res.out.strip().splitlines()) == 1, res.out


def test_manual_split(cluster) -> None:
    assert slmctl("canary", "set", "code", "v1=50", "v2=50", *CLUSTER_FLAGS).code == 0
    time.sleep(1)
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=30) as c:
        got = Counter(c.post("/v1/chat/completions", json={"model": "code", "user": f"m{i}", "messages": [{"role": "user", "content": "x"}]})
                      .headers["x-slm-version"] for i in range(40))
    assert set(got) == {"v1", "v2"}
    assert slmctl("canary", "set", "code", "v1=100", *CLUSTER_FLAGS).code == 0


def test_a_healthy_version_is_promoted_and_a_failing_one_rolled_back(cluster) -> None:
    with Traffic() as traffic:
        time.sleep(2)
        # failure limit 2: one noisy check on a busy machine must not fail a healthy version
        res = slmctl("canary", "start", "code", "--to", "v2", "--steps", "30,60,100", "--interval-s", "4",
                     "--min-requests", "10", "--failure-limit", "2", *CLUSTER_FLAGS, timeout_s=60)
        assert res.code == 0 and "progressing" in res.out, res.out
        second = slmctl("canary", "start", "code", "--to", "v3", *CLUSTER_FLAGS)
        assert second.code != 0 and "already has a rollout" in second.out
        record = wait_state(("promoted", "failed"), 120)
        assert record["state"] == "promoted", record["history"]
        promoted_at = time.monotonic()
        out = status()
        assert out["current"] == {"code": "v2"} and out["splits"]["code"]["v2"] == 100
        time.sleep(2)
        # v2 is now the stable version; v3 fails 30% of its requests
        res = slmctl("canary", "start", "code", "--to", "v3", "--steps", "20,50,100", "--interval-s", "4",
                     "--min-requests", "10", "--failure-limit", "1", *CLUSTER_FLAGS, timeout_s=60)
        assert res.code == 0, res.out
        v3_started = time.monotonic()
        record = wait_state(("promoted", "failed"), 60)
        assert record["state"] == "failed" and record["step"] == 0  # rolled back from its first step
        rolled_back = time.monotonic()
        time.sleep(2)
    # within one analysis interval of its first (failing) step, with the controller's tick
    assert rolled_back - v3_started < 4 + 1 + 3 + 3  # interval + tick + polling of this test
    results = traffic.results
    during = [r for r in results if v3_started <= r[0] <= rolled_back]
    failed = [r for r in during if r[2] != 200]
    # only v3's share (20%) can fail, and 30% of it does: well under 20% of all requests
    assert during and len(failed) / len(during) < 0.2
    # v3's own failures are its canary's, not the v1 -> v2 rollout's: the controller may
    # split traffic to v3 before `slmctl canary start` returns and v3_started is read
    lost = [r for r in results if r[0] < v3_started and r[2] != 200 and r[3] != "v3"]
    assert not lost, (len(lost), len(results), lost[:5])  # v1 -> v2 lost nothing
    # stickiness: during the v1 -> v2 rollout each user moved at most once, from v1 to v2
    for user in {r[1] for r in results}:
        seq = [r[3] for r in results if r[1] == user and r[0] < promoted_at and r[3]]
        changes = [(a, b) for a, b in zip(seq, seq[1:]) if a != b]
        assert changes in ([], [("v1", "v2")]), (user, changes)
    out = status()
    assert out["current"] == {"code": "v2"} and out["splits"]["code"] == {"v3": 0, "v2": 100}


def test_status_names_the_traffic_store(cluster) -> None:
    res = slmctl("status", *CLUSTER_FLAGS)
    assert "traffic store: Redis at redis://127.0.0.1:" in res.out and "reachable" in res.out


def test_deploy_adds_a_version_in_place_without_failing_a_request(cluster, tmp_path) -> None:
    new = json.loads(json.dumps(CONFIG))
    new["models"][0]["versions"].append(_fake("v4"))
    path = tmp_path / "with-v4.json"
    path.write_text(json.dumps(new))
    with Traffic() as traffic:
        time.sleep(1)
        res = slmctl("deploy", "--config", str(path), *CLUSTER_FLAGS, "--timeout-s", "240", timeout_s=300)
        assert res.code == 0, res.out
        assert "adding ['code-v4']" in res.out
        time.sleep(2)
    assert traffic.results and all(r[2] == 200 for r in traffic.results), Counter(r[2] for r in traffic.results)
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"model": "code@v4", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.headers["x-slm-version"] == "v4"
    # the split and the promoted version survived the update
    assert status()["current"] == {"code": "v2"}


def test_a_candidate_that_fails_to_start_gets_no_traffic(cluster, tmp_path) -> None:
    """Last in this module: it leaves the application with a failed deployment."""
    new = json.loads(json.dumps(CONFIG))
    new["models"][0]["versions"].append(_fake("v4"))
    new["models"][0]["versions"].append({"name": "v5", "engine": {"kind": "hf", "model_path": str(tmp_path / "no-such-model")},
                                          "resources": {"num_cpus": 0.05}})
    path = tmp_path / "with-v5.json"
    path.write_text(json.dumps(new))
    with Traffic() as traffic:
        res = slmctl("deploy", "--config", str(path), *CLUSTER_FLAGS, "--timeout-s", "180", timeout_s=240)
        assert res.code != 0, res.out  # the deploy says it failed ...
        res = slmctl("canary", "start", "code", "--to", "v5", *CLUSTER_FLAGS, timeout_s=60)
        assert res.code != 0 and "not HEALTHY" in res.out, res.out  # ... and no rollout may send it traffic
    assert "code" not in [m for m, r in status()["rollouts"].items() if r["state"] in ("progressing", "paused")]
    # the versions that did start kept serving throughout
    assert traffic.results and all(r[2] == 200 for r in traffic.results), Counter(r[2] for r in traffic.results)
