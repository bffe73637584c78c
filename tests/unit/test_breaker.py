"""The frontier's circuit breaker (``cluster.breaker``) as a table over an injected clock, the
plans it changes (``cluster.strategy.plan``), the call wrappers that apply it and retry a
dead replica once (``deployments.gateway.faults``) and the model server's stall watch."""

from __future__ import annotations

import pickle
import time
from typing import AsyncIterator

import pytest

from cluster import policy, strategy
from cluster.breaker import CLOSED, HALF_OPEN, OPEN, TRIAL_RETRY_AFTER_S, BreakerSettings, CircuitBreaker
from cluster.errors import (
    CircuitOpenError,
    EngineError,
    EngineTimeoutError,
    InvalidRequestError,
    ReplicaGoneError,
)
from cluster.loader import config_from_dict
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, RouteDecision, SamplingParams, Usage
from deployments.engines.fake import FakeEngine
from deployments.gateway.ensemble import Ensemble, with_id
from deployments.gateway.errors import to_slm_error
from deployments.gateway.faults import breaker_guarded, replica_gone, retry_after_headers, retry_once
from deployments.model_server import StallWatch

# --- the state machine ----------------------------------------------------------------------

S = BreakerSettings(failures=3, window_s=10.0, cooldown_s=5.0)

# (steps, expected state after them, expected blocked_for after them); each step is
# (time, event) with event one of "fail", "ok", "release", "acquire".
CASES = [
    ("fresh", [], CLOSED, 0.0),
    ("two failures stay closed", [(0, "fail"), (1, "fail")], CLOSED, 0.0),
    ("three failures in the window open it", [(0, "fail"), (1, "fail"), (2, "fail")], OPEN, 5.0),
    ("failures older than the window are forgotten", [(0, "fail"), (1, "fail"), (11, "fail")], CLOSED, 0.0),
    ("a success does not erase earlier failures", [(0, "fail"), (1, "fail"), (1.5, "ok"), (2, "fail")], OPEN, 5.0),
    ("after the cooldown it is half-open, one call may go", [(0, "fail"), (1, "fail"), (2, "fail"), (7, "tick")], HALF_OPEN, 0.0),
    ("the trial taken, the others wait", [(0, "fail"), (1, "fail"), (2, "fail"), (7, "acquire")], HALF_OPEN, TRIAL_RETRY_AFTER_S),
    ("the trial succeeds: closed, failures forgotten", [(0, "fail"), (1, "fail"), (2, "fail"), (7, "acquire"), (7.5, "ok"), (8, "fail")],
     CLOSED, 0.0),
    ("the trial fails: open for another cooldown", [(0, "fail"), (1, "fail"), (2, "fail"), (7, "acquire"), (8, "fail")], OPEN, 5.0),
    ("a trial without a verdict frees the slot", [(0, "fail"), (1, "fail"), (2, "fail"), (7, "acquire"), (8, "release")], HALF_OPEN, 0.0),
    ("a late failure while open keeps the cooldown", [(0, "fail"), (1, "fail"), (2, "fail"), (4, "fail")], OPEN, 3.0),
]


@pytest.mark.parametrize("name,steps,state,blocked", CASES, ids=[c[0] for c in CASES])
def test_breaker_table(name: str, steps: list, state: str, blocked: float) -> None:
    b = CircuitBreaker(S)
    now = 0.0
    for now, event in steps:
        if event == "fail":
            b.failure(now)
        elif event == "ok":
            b.success(now)
        elif event == "release":
            b.release(now)
        elif event == "acquire":
            assert b.acquire(now) == 0.0
    assert b.state(now) == state
    assert b.blocked_for(now) == pytest.approx(blocked)


def test_acquire_refuses_while_open_and_counts_down() -> None:
    b = CircuitBreaker(S)
    for t in (0, 1, 2):
        b.failure(t)
    assert b.acquire(3.0) == pytest.approx(4.0)
    assert b.acquire(6.5) == pytest.approx(0.5)
    assert b.acquire(7.0) == 0.0  # the trial
    assert b.acquire(7.1) == TRIAL_RETRY_AFTER_S  # only one
    assert b.opened == 1


# --- the plan ---------------------------------------------------------------------------------


def _fake(name: str, **engine: object) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 8, "tokens_per_s": 0, **engine}}


def make_config(frontier: dict | None = None, **extra: object):
    return config_from_dict({
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"],
             "versions": [_fake("sure"), _fake("unsure", unsure_share=1.0), _fake("flaky", failure_rate=1.0)]},
            {"name": "general", "role": "general", "versions": [_fake("v1")]},
            {"name": "frontier", "role": "frontier", "versions": [frontier or _fake("v1")]},
        ],
        **extra,
    })


PUBLIC = policy.Screened("public", (), ())
ESCALATING = RouteDecision("code", "unsure", "auto", domain="code", escalation_score=0.9, escalation_threshold=0.5)


@pytest.mark.parametrize(
    "strat,first,auto,blocked,tiers,escalated,skipped",
    [
        ("route", ESCALATING, True, 0.0, ("frontier-v1",), "true", None),
        ("route", ESCALATING, True, 12.0, ("code-unsure",), "failed", "breaker"),
        ("cascade", RouteDecision("code", "unsure", "named"), False, 0.0, ("code-unsure", "frontier-v1"), "false", None),
        ("cascade", RouteDecision("code", "unsure", "named"), False, 12.0, ("code-unsure",), "false", "breaker"),
        ("race", RouteDecision("code", "unsure", "named"), False, 0.0, ("code-unsure", "frontier-v1"), "false", None),
        ("race", RouteDecision("code", "unsure", "named"), False, 12.0, ("code-unsure",), "false", "breaker"),
    ],
)
def test_an_open_breaker_takes_the_frontier_out_of_the_plan(strat, first, auto, blocked, tiers, escalated, skipped) -> None:
    p = strategy.plan(make_config(), strat, first, auto=auto, screened=PUBLIC, budget_ms=None, expected_ms={}, frontier_blocked_s=blocked)
    assert tuple(t.deployment_name for t in p.tiers) == tiers
    assert (p.escalated, p.frontier_skipped) == (escalated, skipped)


@pytest.mark.parametrize("strat", ["route", "cascade", "race"])
def test_a_request_naming_the_frontier_gets_a_503_with_the_time_left(strat: str) -> None:
    named = RouteDecision("frontier", "v1", "named")
    with pytest.raises(CircuitOpenError) as caught:
        strategy.plan(make_config(), strat, named, auto=False, screened=PUBLIC, budget_ms=None, expected_ms={}, frontier_blocked_s=7.2)
    err = caught.value
    assert (err.http_status, err.code, err.to_openai()["error"]["type"]) == (503, "frontier_circuit_open", "service_unavailable")
    assert retry_after_headers(err) == {"retry-after": "8"}
    again = pickle.loads(pickle.dumps(err))  # crosses Ray intact
    assert isinstance(again, CircuitOpenError) and again.retry_after_s == 7.2


def test_the_config_has_the_breaker_and_rejects_nonsense() -> None:
    cfg = make_config(strategy={"frontier_breaker": {"failures": 2, "window_s": 5, "cooldown_s": 9}})
    assert cfg.strategy.frontier_breaker.settings() == BreakerSettings(2, 5.0, 9.0)
    with pytest.raises(Exception):
        make_config(strategy={"frontier_breaker": {"failures": 0}})
    assert retry_after_headers(EngineError("x")) == {}


# --- the wrappers ---------------------------------------------------------------------------------


class ActorDiedError(Exception):
    """Named like Ray's: ``replica_gone`` matches Ray's errors by class name."""


class BackPressureError(Exception):
    pass


FINAL = GenerationChunk(finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1))


class Scripted:
    """Opens streams that each follow a script: chunks, then optionally raise."""

    def __init__(self, *scripts: tuple[list[GenerationChunk], BaseException | None]) -> None:
        self.scripts = list(scripts)
        self.opened = 0
        self.closed = 0

    def open(self) -> AsyncIterator[GenerationChunk]:
        chunks, exc = self.scripts[self.opened]
        self.opened += 1

        async def gen() -> AsyncIterator[GenerationChunk]:
            try:
                for c in chunks:
                    yield c
                if exc is not None:
                    raise exc
            finally:
                self.closed += 1

        return gen()


async def drain(chunks: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [c async for c in chunks]


TOKEN = GenerationChunk(text="hi")


@pytest.mark.parametrize(
    "scripts,opened,retries,raises",
    [
        # the replica dies before the first chunk: one retry, which answers
        ([([], ActorDiedError("dead")), ([TOKEN, FINAL], None)], 2, 1, None),
        # it dies on the retry too: the typed 503, no third try
        ([([], ActorDiedError("dead")), ([], ActorDiedError("dead"))], 2, 1, ReplicaGoneError),
        # it dies after a token: no retry, the typed error
        ([([TOKEN], ActorDiedError("dead"))], 1, 0, ReplicaGoneError),
        # the engine's own errors, a full queue and client errors are never retried
        ([([], EngineError("boom"))], 1, 0, EngineError),
        ([([], EngineTimeoutError("late"))], 1, 0, EngineTimeoutError),
        ([([], BackPressureError("full"))], 1, 0, BackPressureError),
        ([([], InvalidRequestError("bad"))], 1, 0, InvalidRequestError),
        ([([TOKEN, FINAL], None)], 1, 0, None),
    ],
)
async def test_retry_once_only_a_dead_replica_before_the_first_chunk(scripts, opened, retries, raises) -> None:
    s = Scripted(*scripts)
    seen: list[ReplicaGoneError] = []
    stream = retry_once(s.open, seen.append)
    if raises is None:
        assert await drain(stream) == [TOKEN, FINAL]
    else:
        with pytest.raises(raises):
            await drain(stream)
    assert (s.opened, len(seen), s.closed) == (opened, retries, opened)


def test_replica_gone_knows_rays_errors_by_name_and_nothing_else() -> None:
    assert isinstance(replica_gone(ActorDiedError("x")), ReplicaGoneError)
    assert replica_gone(BackPressureError("x")) is None
    assert replica_gone(EngineError("x")) is None
    err = replica_gone(ActorDiedError("x"))
    assert err is not None and (err.http_status, err.code, err.retryable) == (503, "replica_unavailable", True)
    assert to_slm_error(err) is err


async def test_the_guard_reports_each_call_to_the_breaker() -> None:
    now = [0.0]
    b = CircuitBreaker(BreakerSettings(failures=2, window_s=60, cooldown_s=10))
    clock = lambda: now[0]  # noqa: E731

    async def call(*script) -> None:
        await drain(breaker_guarded(b, clock, Scripted(script).open))

    with pytest.raises(InvalidRequestError):
        await call([], InvalidRequestError("bad"))  # a client error is no failure
    await call([TOKEN, FINAL], None)
    assert b.state(0) == CLOSED
    for _ in range(2):
        with pytest.raises(EngineTimeoutError):
            await call([TOKEN], EngineTimeoutError("late"))
    assert b.state(0) == OPEN
    s = Scripted(([TOKEN, FINAL], None))
    with pytest.raises(CircuitOpenError):
        await drain(breaker_guarded(b, clock, s.open))
    assert s.opened == 0  # refused without a call
    now[0] = 10.0  # half-open: the trial is cancelled (closed early), which frees its slot
    trial = breaker_guarded(b, clock, Scripted(([TOKEN, FINAL], None)).open)
    assert await trial.__anext__() == TOKEN
    await trial.aclose()
    assert (b.state(10.0), b.blocked_for(10.0)) == (HALF_OPEN, 0.0)
    await call([TOKEN, FINAL], None)
    assert b.state(10.0) == CLOSED


# --- the ensemble: a failing frontier opens the breaker, then the small answer is kept ------------


async def test_a_failing_frontier_opens_the_breaker_and_cascades_keep_the_small_answer() -> None:
    cfg = make_config(
        frontier=_fake("v1", failure_rate=1.0, failure_error="unavailable"),
        strategy={"frontier_breaker": {"failures": 3, "window_s": 60, "cooldown_s": 60}},
    )
    engines = {}
    for m, v in cfg.deployments():
        engines[f"{m.name}-{v.name}"] = FakeEngine(v.engine)
        await engines[f"{m.name}-{v.name}"].start()
    opened: list[str] = []

    def opener(d: RouteDecision, r: GenerationRequest):
        opened.append(d.deployment_name)
        return engines[d.deployment_name].generate(r)

    ens = Ensemble(cfg, opener, time.monotonic)
    gen = GenerationRequest("r", (ChatMessage("user", "write a function"),), SamplingParams(max_tokens=8))
    results = []
    for _ in range(5):
        p = strategy.plan(cfg, "cascade", RouteDecision("code", "unsure", "named"), auto=False, screened=PUBLIC, budget_ms=None,
                          expected_ms={}, frontier_blocked_s=ens.frontier_blocked_s())
        out = await ens.run(p, lambda d: with_id(gen, d, logprobs=True), stream=False, started_at=time.monotonic())
        text = "".join([c.text async for c in out.winner.replay()])
        results.append((out.winner.name, out.escalated, bool(text)))
    # every answer is the small one, flagged failed; the frontier was tried 3 times, then not
    assert results == [("code-unsure", "failed", True)] * 5
    assert opened.count("frontier-v1") == 3
    assert ens.frontier_blocked_s() > 50


async def test_a_dead_replica_is_retried_once_and_counted_on_the_call() -> None:
    cfg = make_config()
    engine = FakeEngine(cfg.model("code").version("sure").engine)  # type: ignore[union-attr]
    await engine.start()
    attempts = []

    def opener(d: RouteDecision, r: GenerationRequest):
        attempts.append(d.deployment_name)
        if len(attempts) == 1:
            async def dead() -> AsyncIterator[GenerationChunk]:
                raise ActorDiedError("killed")
                yield  # pragma: no cover - an async generator

            return dead()
        return engine.generate(r)

    ens = Ensemble(cfg, opener, time.monotonic)
    gen = GenerationRequest("r", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=4))
    p = strategy.plan(cfg, "route", RouteDecision("code", "sure", "named"), auto=False, screened=PUBLIC, budget_ms=None, expected_ms={})
    out = await ens.run(p, lambda d: with_id(gen, d, logprobs=False), stream=False, started_at=time.monotonic())
    chunks = [c async for c in out.winner.replay()]
    assert chunks[-1].is_final and attempts == ["code-sure", "code-sure"]
    assert (out.winner.retries, out.retries) == (1, 1)


# --- the model server's stall watch -----------------------------------------------------------------


def test_stall_watch_counts_only_gaps_after_progress() -> None:
    now = [0.0]
    w = StallWatch(lambda: now[0])
    queued, streaming = w.start(), w.start()
    w.progress(streaming)
    now[0] = 5.0
    assert w.stalled(4.0) == 1  # the queued one has not started: the first-token deadline's job
    w.progress(streaming)
    assert w.stalled(4.0) == 0
    now[0] = 9.5
    assert w.stalled(4.0) == 1
    w.with_caller(streaming)  # its chunks wait for the caller: a slow reader is no stall
    now[0] = 60.0
    assert w.stalled(4.0) == 0
    w.progress(streaming)
    w.done(streaming)
    w.done(queued)
    assert w.stalled(0.0) == 0

