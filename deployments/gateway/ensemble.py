"""Run a plan (``cluster.strategy.Plan``): route, cascade or race over model calls.

Every model call is a ``Call`` (``deployments.gateway.calls``): pumped in the background
into a buffer, so that the strategy can watch several at once, replayed to the client when
it wins, and cancelled (aborting the generation in the engine) when it loses.

The decisions themselves (which tiers, budgets, the gate's score, the hedge budget) are
pure functions in ``cluster``; this module only sequences I/O.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from cluster import costing, gate
from cluster.breaker import CircuitBreaker
from cluster.config import ClusterConfig
from cluster.errors import ReplicaGoneError
from cluster.strategy import (
    ESCALATED,
    ESCALATION_FAILED,
    NOT_ESCALATED,
    SKIPPED_BUDGET,
    HedgeBudget,
    LatencyEstimates,
    Plan,
    fits,
)
from cluster.types import GenerationChunk, GenerationRequest, RouteDecision
from deployments.gateway.calls import Call, CallObserver
from deployments.gateway.faults import breaker_guarded, retry_once


# Opens the chunk stream of one model call (the gateway's: ``timed_chunks`` over a handle or an in-gateway model).
Opener = Callable[[RouteDecision, GenerationRequest], AsyncIterator[GenerationChunk]]


@dataclass
class Outcome:
    """What a strategy did: the call that answers, and everything the headers report."""

    strategy: str
    winner: Call
    calls: list[Call]
    escalated: str = NOT_ESCALATED
    gate_score: float | None = None
    race_winner: str | None = None  # small | frontier
    decided_ms: float | None = None  # from the start to the first gate decision (cascade, race)
    failed: list[str] = field(default_factory=list)
    _bill: costing.Bill | None = field(default=None, repr=False, compare=False)

    def bill(self, cfg: ClusterConfig) -> costing.Bill:
        """The request's records and costs, computed when first asked and kept: that is once
        the answer is over (the cost headers or a stream's trailer, the key's settlement, the
        audit line and the metrics all ask then), so all of them report the same figures
        from one computation instead of four."""
        if self._bill is None:
            self._bill = costing.bill(cfg, self.records())
        return self._bill

    @property
    def cancelled(self) -> list[str]:
        return [c.name for c in self.calls if c.cancelled]

    @property
    def retries(self) -> int:
        return sum(c.retries for c in self.calls)

    def records(self) -> list[costing.CallRecord]:
        out = []
        for call in self.calls:
            if call is self.winner:
                outcome = costing.WON
            elif call.cancelled:
                outcome = costing.CANCELLED
            elif call.error is not None:
                outcome = costing.FAILED
            else:
                outcome = costing.LOST
            out.append(call.record(outcome))
        return out


class Ensemble:
    """Executes plans. One per gateway replica: it owns the hedge budget and the live
    latency estimates, which outlive requests."""

    def __init__(self, cfg: ClusterConfig, opener: Opener, clock: Callable[[], float], observer: CallObserver | None = None) -> None:
        self.cfg = cfg
        self.opener = opener
        self.clock = clock
        self.observer = observer
        race = cfg.strategy.race
        self.hedges = HedgeBudget(race.max_hedged_share, race.hedge_burst)
        priors = {f"{m.name}-{v.name}": v.latency_prior_ms for m, v in cfg.deployments()}
        self.latency = LatencyEstimates(priors, cfg.strategy.latency_ewma_alpha)
        # One breaker for the frontier model, whichever of its versions a call goes to.
        frontier, bcfg = cfg.frontier, cfg.strategy.frontier_breaker
        self.breaker = CircuitBreaker(bcfg.settings()) if frontier is not None and bcfg.enabled else None
        self.frontier_model = frontier.name if frontier is not None else None

    def expected_ms(self) -> dict[str, float]:
        return dict(self.latency.values)

    def frontier_blocked_s(self) -> float:
        """Seconds the frontier's breaker still refuses calls (0.0: calls may go), for the plan."""
        return self.breaker.blocked_for(self.clock()) if self.breaker is not None else 0.0

    # --- calls ------------------------------------------------------------------------

    def open_call(self, decision: RouteDecision, requests: Callable[[RouteDecision], GenerationRequest]) -> Call:
        """One call outside any plan (shadow traffic): pumped and observed like the others."""
        return self._open(decision, requests)

    def _open(self, decision: RouteDecision, requests: Callable[[RouteDecision], GenerationRequest], pumped: bool = True) -> Call:
        req = requests(decision)
        chars = sum(len(m.content) for m in req.messages)
        call: Call | None = None

        def retried(_: ReplicaGoneError) -> None:
            if call is not None:
                call.retries += 1

        def attempt() -> AsyncIterator[GenerationChunk]:
            return retry_once(lambda: self.opener(decision, req), retried)

        chunks = attempt()
        if self.breaker is not None and decision.model == self.frontier_model:
            chunks = breaker_guarded(self.breaker, self.clock, attempt)
        call = Call(decision, self._observed(decision, chunks), self.clock, chars, self.observer, pumped=pumped)
        return call

    async def _observed(self, decision: RouteDecision, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        """The call's stream; a whole answer's latency feeds the deployment's estimate."""
        start = self.clock()
        try:
            async for chunk in chunks:
                if chunk.is_final:  # before the yield: the consumer stops after the final chunk
                    self.latency.observe(decision.deployment_name, (self.clock() - start) * 1000)
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def run(
        self,
        plan: Plan,
        requests: Callable[[RouteDecision], GenerationRequest],
        *,
        stream: bool,
        started_at: float,
    ) -> Outcome:
        """Run ``plan``; ``requests(decision)`` builds each call's request (its own id, and
        redacted text for external models). Raises the typed error when nothing answers."""
        min_tokens = self.cfg.strategy.gate.min_tokens if stream else None
        opened: list[Call] = []

        def open_(decision: RouteDecision, pumped: bool = True) -> Call:
            call = self._open(decision, requests, pumped)
            opened.append(call)
            return call

        try:
            if plan.strategy == "race" and len(plan.tiers) == 2:
                return await self._race(plan, open_, min_tokens, started_at)
            if plan.strategy in ("cascade", "race") and self._gates(plan):
                out = await self._cascade(plan, open_, min_tokens, started_at)
                if plan.strategy == "race":
                    out.race_winner = "small" if out.winner is out.calls[0] else "frontier"
                return out
            call = open_(plan.tiers[0], pumped=False)  # the only call, read by its replay alone (calls.Call)
            return Outcome(plan.strategy, call, [call], escalated=plan.escalated)
        except BaseException:
            # Nothing answers (or the client went away): no call may run on.
            for call in opened:
                await call.cancel()
            raise

    def _gates(self, plan: Plan) -> bool:
        # A plan of one tier still gates when its frontier was skipped (budget, or its
        # breaker is open): the header then says whether the skip mattered. Without any
        # frontier or escalation target, there is nothing to gate for.
        return len(plan.tiers) > 1 or plan.frontier_skipped in ("budget", "breaker")

    async def _escalate(self, out: Outcome, fallback: Call | None, target: RouteDecision, open_: Callable[[RouteDecision], Call]) -> Outcome:
        """Start ``target``; when it streams, it answers and the fallback is cancelled. When
        it fails before its first chunk, the fallback (the small answer) answers, flagged
        ``failed``; with no fallback the error is raised."""
        call = open_(target)
        out.calls.append(call)
        await call.wait_started()
        if call.error is not None and not call.buffer:
            out.failed.append(call.name)
            if fallback is None:
                raise call.error
            out.winner, out.escalated = fallback, ESCALATION_FAILED
            return out
        if fallback is not None:
            await fallback.cancel()
        out.winner, out.escalated = call, ESCALATED
        return out

    async def _cascade(self, plan: Plan, open_: Callable[[RouteDecision], Call], min_tokens: int | None, started_at: float) -> Outcome:
        """Each tier answers in turn; every tier but the last is gated. A tier that fails
        the gate stays alive as the fallback until the next tier streams."""
        tiers = plan.tiers
        current = open_(tiers[0])
        out = Outcome(plan.strategy, current, [current])
        for i in range(len(tiers)):
            if i == len(tiers) - 1 and i > 0:
                return out  # the last tier answers ungated (_escalate made it the winner)
            await current.wait_tokens(min_tokens)
            if out.decided_ms is None:
                out.decided_ms = (self.clock() - started_at) * 1000
            failed = current.error is not None and current.final is None
            fallback: Call | None = None
            if failed:
                out.failed.append(current.name)
            else:
                out.gate_score = current.gate_score(self.cfg)
                if gate.passes(out.gate_score, self.cfg.strategy.gate.pass_bar):
                    out.winner = current
                    return out
                fallback = current
            if i == len(tiers) - 1:
                # A one-tier plan: its frontier was skipped (budget or breaker) before the start.
                if failed:
                    raise current.error  # type: ignore[misc]
                out.escalated = {"budget": SKIPPED_BUDGET, "breaker": ESCALATION_FAILED}.get(plan.frontier_skipped or "", NOT_ESCALATED)
                return out
            nxt = tiers[i + 1]
            elapsed_ms = (self.clock() - started_at) * 1000
            if fallback is not None and not fits(elapsed_ms, self.latency.expected(nxt.deployment_name), plan.budget_ms):
                out.winner, out.escalated = fallback, SKIPPED_BUDGET
                return out
            await self._escalate(out, fallback, nxt, open_)
            if out.escalated == ESCALATION_FAILED:
                return out
            current = out.winner
        return out

    async def _race(self, plan: Plan, open_: Callable[[RouteDecision], Call], min_tokens: int | None, started_at: float) -> Outcome:
        """The small model and the frontier run at once (or the frontier after the hedge
        delay). The first of "the small answer passes the gate" and "the frontier finishes"
        wins; the other call is cancelled. A small answer that fails the gate (or a small
        call that fails) hands the answer to the frontier."""
        small_d, frontier_d = plan.tiers
        race_start = self.clock()
        small = open_(small_d)
        out = Outcome("race", small, [small], race_winner="small")
        self.hedges.offer()
        frontier: Call | None = None
        delay_s = self.cfg.strategy.race.hedge_after_ms / 1000

        def start_frontier() -> asyncio.Task | None:
            nonlocal frontier
            if not self.hedges.take():
                return None  # over the hedge budget: this race runs as a cascade
            frontier = open_(frontier_d)
            out.calls.append(frontier)
            return asyncio.create_task(frontier.wait_tokens(None))

        frontier_done = start_frontier() if delay_s == 0 else None
        timer = asyncio.create_task(asyncio.sleep(delay_s)) if delay_s > 0 else None
        small_ready = asyncio.create_task(small.wait_tokens(min_tokens))
        try:
            while not small_ready.done():
                waits = [t for t in (small_ready, timer, frontier_done) if t is not None]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if timer is not None and timer.done():
                    timer = None
                    if not small_ready.done():
                        frontier_done = start_frontier()
                if frontier_done is not None and frontier_done.done():
                    frontier_done = None
                    assert frontier is not None
                    if frontier.final is not None:
                        # The frontier finished before the small answer was judged: it wins.
                        out.decided_ms = (self.clock() - race_start) * 1000
                        await small.cancel()
                        out.winner, out.escalated, out.race_winner = frontier, ESCALATED, "frontier"
                        return out
                    out.failed.append(frontier.name)  # the small answer is all there is now
                    frontier = None
            out.decided_ms = (self.clock() - race_start) * 1000
            small_failed = small.error is not None and small.final is None
            if small_failed:
                out.failed.append(small.name)
            else:
                out.gate_score = small.gate_score(self.cfg)
                if gate.passes(out.gate_score, self.cfg.strategy.gate.pass_bar):
                    if frontier is not None:
                        await frontier.cancel()
                    return out
            # The frontier answers. Until it streams, the small call stays as the fallback.
            if frontier is not None:
                await frontier.wait_started()
                if frontier.buffer:
                    await small.cancel()
                    out.winner, out.escalated, out.race_winner = frontier, ESCALATED, "frontier"
                    return out
                out.failed.append(frontier.name)
            if frontier_d.deployment_name in out.failed:
                if small_failed:
                    raise small.error  # type: ignore[misc]
                out.escalated = ESCALATION_FAILED
                return out
            # The frontier never started (hedge budget empty, or its delay had not run out):
            # escalate as a cascade would.
            elapsed_ms = (self.clock() - started_at) * 1000
            if not small_failed and not fits(elapsed_ms, self.latency.expected(frontier_d.deployment_name), plan.budget_ms):
                out.escalated = SKIPPED_BUDGET
                return out
            await self._escalate(out, None if small_failed else small, frontier_d, open_)
            out.race_winner = "small" if out.winner is small else "frontier"
            return out
        finally:
            for task in (small_ready, timer, frontier_done):
                if task is not None and not task.done():
                    task.cancel()


def with_id(request: GenerationRequest, decision: RouteDecision, *, logprobs: bool) -> GenerationRequest:
    """Each call gets its own engine request id, so aborting one call never touches another."""
    sampling = replace(request.sampling, logprobs=request.sampling.logprobs or logprobs)
    return replace(request, request_id=f"{request.request_id}:{decision.deployment_name}", sampling=sampling)
