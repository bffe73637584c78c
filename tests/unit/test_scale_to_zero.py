"""Scale to zero: the pure cover-the-cold-specialist decision, and the gateway's view of
which deployments are cold, with its warm-up calls (a fake handle, a fake status source)."""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import pytest

from cluster.loader import load_profile
from cluster.routing import COLD_REASON, cover_cold, decide_auto, resolve_explicit
from cluster.types import RouteDecision, RouteScores
from deployments.gateway.warmth import Warmth

CFG = load_profile("sim")


def auto(domain: str, confidence: float = 0.9) -> RouteDecision:
    return decide_auto(CFG, RouteScores(domain=domain, domain_probs={domain: confidence}, escalation_score=0.1))


# (case, decision, cold deployments, model, version, reason)
CASES = [
    ("warm specialist: its domain", auto("math"), set(), "math", "v1", "domain:math"),
    ("cold specialist: the general model covers", auto("math"), {"math-v1"}, "general", "v1", COLD_REASON),
    ("another specialist is cold: no change", auto("math"), {"code-v1"}, "math", "v1", "domain:math"),
    ("named model waits for its cold start", resolve_explicit(CFG, "math"), {"math-v1"}, "math", "v1", "named"),
    ("pinned model waits for its cold start", resolve_explicit(CFG, "math@v1"), {"math-v1"}, "math", "v1", "pinned"),
    ("already general (low confidence)", auto("math", 0.1), {"math-v1"}, "general", "v1", "general:low-confidence-math"),
    ("the general model cold too: the specialist starts", auto("math"), {"math-v1", "general-v1"}, "math", "v1", "domain:math"),
]


@pytest.mark.parametrize(("decision", "cold", "model", "version", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cover_cold(decision: RouteDecision, cold: set[str], model: str, version: str, reason: str) -> None:
    out = cover_cold(CFG, decision, frozenset(cold))
    assert (out.model, out.version, out.reason) == (model, version, reason)
    assert out.domain == decision.domain  # the router's view rides along
    assert out.escalation_score == decision.escalation_score


class FakeMethod:
    def __init__(self, release: asyncio.Event, calls: list[str], name: str) -> None:
        self.release, self.calls, self.name = release, calls, name

    def remote(self) -> Any:
        self.calls.append(self.name)

        async def wait() -> dict:
            await self.release.wait()
            return {"ok": True}

        return wait()


class FakeHandle:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.started = asyncio.Event()
        self.ready = FakeMethod(self.started, calls, name)


async def test_warmth_polls_warms_up_once_and_closes() -> None:
    counts: dict[str, int] = {"math-v1": 0, "code-v1": 1}

    async def read() -> Mapping[str, int]:
        return dict(counts)

    calls: list[str] = []
    handle = FakeHandle("math-v1", calls)
    warmth = Warmth({"math-v1": True, "legal-v1": False}, {"math-v1": handle}, read, poll_s=0.01, warm_up_timeout_s=5)
    # before the first poll: deployed with no replica means cold
    assert warmth.cold == {"math-v1"}
    warmth.ensure_started()
    await asyncio.sleep(0.05)
    assert warmth.cold == {"math-v1", "legal-v1"}  # legal is not in Serve's answer: no replica
    assert warmth.warm_up("math-v1") and not warmth.warm_up("math-v1")  # one in flight at a time
    assert not warmth.warm_up("unknown-v1")
    await asyncio.sleep(0.02)
    assert calls == ["math-v1"] and warmth.status()["warming"] == ["math-v1"]
    handle.started.set()  # the replica is up and answers ready()
    await asyncio.sleep(0.005)
    counts["math-v1"] = 1
    await asyncio.sleep(0.05)
    assert "math-v1" not in warmth.cold and warmth.status()["warming"] == []
    await warmth.close()


async def test_warmth_keeps_its_last_view_when_serve_cannot_answer() -> None:
    fail = False

    async def read() -> Mapping[str, int]:
        if fail:
            raise ConnectionError("controller gone")
        return {"math-v1": 1}

    warmth = Warmth({"math-v1": True}, {}, read, poll_s=0.01)
    await warmth.refresh()
    assert warmth.cold == frozenset() and warmth.healthy
    fail = True
    await warmth.refresh()
    assert warmth.cold == frozenset() and not warmth.healthy


async def test_no_watched_deployment_no_poller() -> None:
    async def read() -> Mapping[str, int]:
        raise AssertionError("must not poll")

    warmth = Warmth({}, {}, read)
    warmth.ensure_started()
    assert warmth._poller is None
    await warmth.close()


async def test_a_read_begun_before_a_warm_up_answered_does_not_make_it_cold_again() -> None:
    """Serve's counts are read in a thread; one that started while the replica was still
    starting finishes after the warm-up answered and says 0 running. It is older news."""
    read_started, read_release = asyncio.Event(), asyncio.Event()

    async def slow_read() -> Mapping[str, int]:
        read_started.set()
        await read_release.wait()
        return {"math-v1": 0}

    calls: list[str] = []
    handle = FakeHandle("math-v1", calls)
    warmth = Warmth({"math-v1": True}, {"math-v1": handle}, slow_read, warm_up_timeout_s=5)
    refresh = asyncio.create_task(warmth.refresh())
    await read_started.wait()
    assert warmth.warm_up("math-v1")
    handle.started.set()
    await asyncio.sleep(0.01)
    assert "math-v1" not in warmth.cold  # the warm-up's answer
    read_release.set()
    await refresh
    assert "math-v1" not in warmth.cold  # the stale read did not undo it

    async def later_read() -> Mapping[str, int]:
        return {"math-v1": 0}

    warmth.counts = later_read  # a read begun after the warm-up: scaled to zero again
    await warmth.refresh()
    assert "math-v1" in warmth.cold
    await warmth.close()
