"""The strategy runner (``deployments.gateway.ensemble``) over real in-process engines:
fake engines, and the real SmolLM2 through the ``hf`` engine for its cancellation."""

from __future__ import annotations

import asyncio
import time


from cluster import policy, strategy
from cluster.config import ClusterConfig
from cluster.loader import config_from_dict
from cluster.types import ChatMessage, GenerationRequest, RouteDecision, SamplingParams
from deployments.engines.fake import FakeEngine
from deployments.gateway.ensemble import Ensemble, with_id


def _fake(name: str, **engine: object) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 16, "tokens_per_s": 400, **engine}}


def make_config(frontier: dict | None = None, **extra: object) -> ClusterConfig:
    return config_from_dict(
        {
            "models": [
                {
                    "name": "code",
                    "role": "specialist",
                    "domains": ["code"],
                    "versions": [
                        _fake("sure"),
                        _fake("unsure", unsure_share=1.0),
                        _fake("slow", ttft_ms=1500),
                        _fake("broken", failure_rate=1.0),
                        _fake("long", default_completion_tokens=64, tokens_per_s=100),
                    ],
                },
                {"name": "general", "role": "general", "versions": [_fake("v1", unsure_share=1.0)]},
                {"name": "frontier", "role": "frontier", "versions": [frontier or _fake("v1", ttft_ms=300, tokens_per_s=100)]},
            ],
            **extra,
        }
    )


class Harness:
    def __init__(self, cfg: ClusterConfig, engines: dict[str, object]) -> None:
        self.cfg = cfg
        self.engines = engines
        self.ensemble = Ensemble(cfg, lambda d, r: engines[d.deployment_name].generate(r), time.monotonic)

    async def run(self, strat: str, version: str, *, stream: bool = False, budget: float | None = None, max_tokens: int = 16):
        first = RouteDecision("code", version, "named")
        p = strategy.plan(
            self.cfg, strat, first, auto=False, screened=policy.Screened("public", (), ()), budget_ms=budget,
            expected_ms=self.ensemble.expected_ms(),
        )
        gen = GenerationRequest("r", (ChatMessage("user", "write a function"),), SamplingParams(max_tokens=max_tokens))
        out = await self.ensemble.run(p, lambda d: with_id(gen, d, logprobs=True), stream=stream, started_at=time.monotonic())
        text = "".join([c.text async for c in out.winner.replay()])
        return out, text


async def fakes(cfg: ClusterConfig) -> dict[str, FakeEngine]:
    engines = {}
    for m, v in cfg.deployments():
        if v.engine.kind == "fake":
            engine = FakeEngine(v.engine)
            await engine.start()
            engines[f"{m.name}-{v.name}"] = engine
    return engines


async def test_three_tier_cascade_climbs_until_the_last_tier() -> None:
    cfg = make_config(strategy={"cascade_tiers": ["routed", "general", "frontier"]})
    h = Harness(cfg, await fakes(cfg))
    out, text = await h.run("cascade", "unsure")
    assert out.winner.name == "frontier-v1" and out.escalated == "true"
    assert [c.name for c in out.calls] == ["code-unsure", "general-v1", "frontier-v1"]
    assert [r.outcome for r in out.records()] == ["lost", "lost", "won"]
    assert len(text.split()) == 16


async def test_the_gate_may_decide_on_a_prefix_when_streaming() -> None:
    cfg = make_config(strategy={"gate": {"min_tokens": 4}})
    engines = await fakes(cfg)
    h = Harness(cfg, engines)
    t0 = time.monotonic()
    out, text = await h.run("cascade", "long", stream=True, max_tokens=64)
    # passed on 4 tokens (a prefix), yet the whole answer streams
    assert out.winner.name == "code-long" and len(text.split()) == 64
    assert time.monotonic() - t0 > 0.5  # 64 tokens at 100/s
    # without streaming the gate reads the whole answer
    out, _ = await h.run("cascade", "long", stream=False, max_tokens=64)
    assert out.winner.final is not None


async def test_a_prefix_that_fails_the_gate_escalates_early() -> None:
    cfg = make_config(strategy={"gate": {"min_tokens": 4}})
    engines = await fakes(cfg)
    engines["code-long"] = FakeEngine(cfg.model("code").version("long").engine.model_copy(update={"unsure_share": 1.0}))
    await engines["code-long"].start()
    h = Harness(cfg, engines)
    out, _ = await h.run("cascade", "long", stream=True, max_tokens=64)
    assert out.winner.name == "frontier-v1"
    # the small call was cancelled once the frontier streamed: it never finished its 64 tokens
    assert engines["code-long"].aborted == 1 and engines["code-long"].completed == 0


async def test_a_budget_that_the_next_tier_would_break_keeps_the_small_answer() -> None:
    cfg = make_config()
    h = Harness(cfg, await fakes(cfg))
    out, _ = await h.run("cascade", "unsure", budget=200)  # frontier prior: 300 + 15 tokens / 100/s
    assert out.winner.name == "code-unsure" and out.escalated == "skipped-budget"
    out, _ = await h.run("cascade", "unsure", budget=5000)
    assert out.winner.name == "frontier-v1" and out.escalated == "true"


async def test_live_latency_feeds_the_budget() -> None:
    cfg = make_config()
    h = Harness(cfg, await fakes(cfg))
    prior = h.ensemble.latency.expected("frontier-v1")
    await h.run("route", "sure")
    await h.run("cascade", "unsure")  # the frontier answers once
    measured = h.ensemble.latency.expected("frontier-v1")
    assert measured != prior and 300 < measured < 1500


async def test_race_frontier_that_finishes_first_wins_and_the_small_call_is_aborted() -> None:
    cfg = make_config(frontier=_fake("v1", ttft_ms=20))
    engines = await fakes(cfg)
    h = Harness(cfg, engines)
    out, _ = await h.run("race", "slow")
    assert out.winner.name == "frontier-v1" and out.race_winner == "frontier" and out.cancelled == ["code-slow"]
    await asyncio.sleep(0.05)
    assert engines["code-slow"].aborted == 1 and engines["code-slow"].active == 0


async def test_race_small_failure_hands_over_to_the_frontier() -> None:
    cfg = make_config()
    h = Harness(cfg, await fakes(cfg))
    out, _ = await h.run("race", "broken")
    assert out.winner.name == "frontier-v1" and out.escalated == "true" and out.failed == ["code-broken"]


async def test_race_cancelled_frontier_tokens_are_counted_and_bounded() -> None:
    """The frontier streams while the long small answer is still being judged; once the
    gate passes, the frontier call stops in its engine within one token's time."""
    cfg = make_config(frontier=_fake("v1", ttft_ms=50, tokens_per_s=50, default_completion_tokens=200))
    engines = await fakes(cfg)
    h = Harness(cfg, engines)
    out, _ = await h.run("race", "long", max_tokens=64)  # ~0.63 s for the small answer
    assert out.winner.name == "code-long" and out.cancelled == ["frontier-v1"]
    abort = engines["frontier-v1"].recent_aborts[-1]
    produced_by_decision = 1 + (out.decided_ms / 1000 - 0.05) * 50
    assert abort["tokens"] <= produced_by_decision + 50 * 0.05 + 1
    record = next(r for r in out.records() if r.model == "frontier")
    assert record.outcome == "cancelled" and not record.usage_exact and record.completion_tokens > 0


async def test_closing_the_answer_early_aborts_the_winner() -> None:
    cfg = make_config()
    engines = await fakes(cfg)
    h = Harness(cfg, engines)
    first = RouteDecision("code", "long", "named")
    p = strategy.plan(cfg, "route", first, auto=False, screened=policy.Screened("public", (), ()), budget_ms=None, expected_ms={})
    gen = GenerationRequest("r", (ChatMessage("user", "x"),), SamplingParams(max_tokens=64))
    out = await h.ensemble.run(p, lambda d: with_id(gen, d, logprobs=False), stream=True, started_at=time.monotonic())
    chunks = out.winner.replay()
    await chunks.__anext__()
    await chunks.aclose()  # the client went away
    await asyncio.sleep(0.05)
    assert engines["code-long"].aborted == 1


async def test_a_route_call_is_read_by_its_replay_alone_and_observed_once() -> None:
    cfg = make_config()
    engines = await fakes(cfg)
    done: list[str] = []

    class Observer:
        def call_done(self, call) -> None:  # type: ignore[no-untyped-def]
            done.append("ok" if call.final is not None else type(call.error).__name__)

        def gated(self, call, passed: bool) -> None:  # type: ignore[no-untyped-def]
            raise AssertionError("a route is never gated")

    ensemble = Ensemble(cfg, lambda d, r: engines[d.deployment_name].generate(r), time.monotonic, Observer())
    gen = GenerationRequest("r", (ChatMessage("user", "x"),), SamplingParams(max_tokens=8))
    screened = policy.Screened("public", (), ())
    for version in ("sure", "broken"):
        p = strategy.plan(cfg, "route", RouteDecision("code", version, "named"), auto=False, screened=screened, budget_ms=None,
                          expected_ms={})
        out = await ensemble.run(p, lambda d: with_id(gen, d, logprobs=False), stream=False, started_at=time.monotonic())
        await asyncio.sleep(0.05)
        assert not out.winner.pumped and out.winner.buffer == []  # nothing runs until the replay is read
        if version == "sure":
            text = "".join([c.text async for c in out.winner.replay()])
            assert len(text.split()) == 8 and out.winner.tokens == 8 and out.winner.ended_at is not None
            assert [r.outcome for r in out.records()] == ["won"]
        else:
            try:
                [c async for c in out.winner.replay()]
            except Exception as exc:  # noqa: BLE001 - the typed error a pumped call would raise
                assert exc is out.winner.error and out.winner.error.http_status >= 500
            else:
                raise AssertionError("a broken engine's answer must raise")
    assert done == ["ok", type(out.winner.error).__name__]


async def test_each_call_gets_its_own_engine_request_id() -> None:
    gen = GenerationRequest("req-1", (ChatMessage("user", "x"),), SamplingParams(logprobs=False))
    a = with_id(gen, RouteDecision("code", "v1", "x"), logprobs=True)
    b = with_id(gen, RouteDecision("frontier", "v1", "x"), logprobs=False)
    assert a.request_id != b.request_id and a.sampling.logprobs and not b.sampling.logprobs


async def test_race_cancels_the_real_hf_engine() -> None:
    """A race whose frontier is the real SmolLM2 on transformers: the small answer passes,
    and the hf engine aborts the cancelled generation."""
    from tests.contract.factories.hf import require_model, shared_loader, smollm_config

    require_model()
    from deployments.engines.hf import HFEngine

    hf_cfg = smollm_config(max_batch_size=2)
    cfg = make_config(frontier={"name": "v1", "engine": hf_cfg.model_dump()})
    engines: dict[str, object] = dict(await fakes(cfg))
    # the small model answers after 0.4 s: the frontier has started decoding by then
    engines["code-sure"] = FakeEngine(cfg.model("code").version("sure").engine.model_copy(update={"ttft_ms": 400}))
    await engines["code-sure"].start()
    hf = HFEngine(hf_cfg, loader=shared_loader)
    await hf.start()
    engines["frontier-v1"] = hf
    try:
        out, _ = await Harness(cfg, engines).run("race", "sure", max_tokens=64)
        assert out.winner.name == "code-sure" and out.cancelled == ["frontier-v1"]
        deadline = time.monotonic() + 10
        while hf.stats.aborted < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert hf.stats.aborted == 1 and hf.stats.completed == 0
    finally:
        await hf.shutdown()
