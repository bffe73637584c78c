"""One model call, pumped in the background into a buffer (the ``Call`` that
``deployments.gateway.ensemble`` sequences).

A pump task reads the call's chunk stream into a buffer, so that several calls can run at
once and the strategy can look at any of them (how many tokens so far, finished or failed)
without stealing chunks from the one that will answer. The winner's chunks are then
replayed to the client from the start of its buffer.

A plan's only call that no gate reads (strategy ``route``) is not pumped: its replay reads
the stream itself, in the request's task, and keeps the same state (``pumped=False``).

A call that loses is cancelled: its pump task is cancelled inside the stream, which runs
the stream's own cleanup (``timed_chunks`` cancels the replica's generator, and the
replica closes the engine's iterator, which aborts the generation in the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Protocol

from cluster import costing, gate
from cluster.config import ClusterConfig
from cluster.errors import EngineError, SLMError
from cluster.types import GenerationChunk, RouteDecision
from deployments.gateway.errors import to_slm_error


class CallObserver(Protocol):
    """Told about every call's end and every gate verdict (the per-version figures)."""

    def call_done(self, call: "Call") -> None: ...

    def gated(self, call: "Call", passed: bool) -> None: ...


class Call:
    """One model call, pumped in the background into a buffer."""

    def __init__(
        self,
        decision: RouteDecision,
        chunks: AsyncIterator[GenerationChunk],
        clock: Callable[[], float],
        prompt_chars: int,
        observer: CallObserver | None = None,
        pumped: bool = True,
    ) -> None:
        self.decision = decision
        self.clock = clock
        self.started_at = clock()
        self.ended_at: float | None = None
        self.first_at: float | None = None
        self.buffer: list[GenerationChunk] = []
        self.tokens = 0
        self.logprobs: list[float] = []
        self.final: GenerationChunk | None = None
        self.error: SLMError | None = None
        self.cancelled = False
        self.retries = 0  # reopened on another replica after its replica died (deployments/gateway/faults.py)
        self.prompt_chars = prompt_chars
        self.observer = observer
        self._chunks = chunks
        self._changed = asyncio.Condition()
        self._ended = False
        # A pumped call runs in a task of its own, so that a strategy can watch it while
        # another runs. A call that is the only one and that no gate reads (strategy
        # route) is pulled by its replay instead: no task, no condition, fewer wake-ups
        # on the front door's hottest path (docs/benchmarks.md, "Front door").
        self.pumped = pumped
        self._task = asyncio.create_task(self._pump()) if pumped else None

    @property
    def name(self) -> str:
        return self.decision.deployment_name

    @property
    def done(self) -> bool:
        return self.final is not None or self.error is not None or self.cancelled

    def _take(self, chunk: GenerationChunk) -> None:
        if self.first_at is None:
            self.first_at = self.clock()
        self.buffer.append(chunk)
        if chunk.logprobs:
            self.tokens += len(chunk.logprobs)
            self.logprobs.extend(lp.logprob for lp in chunk.logprobs)
        elif chunk.text:
            self.tokens += 1  # an engine without logprobs: one token a chunk, at least
        if chunk.is_final:
            self.final = chunk
            if chunk.usage is not None:
                self.tokens = chunk.usage.completion_tokens

    async def _end(self) -> None:
        """Once per call, however it ends: the stream closed (which cancels the replica's
        work when it did not finish) and the observer told."""
        if self._ended:
            return
        self._ended = True
        self.ended_at = self.clock()
        with contextlib.suppress(Exception):
            await self._chunks.aclose()  # type: ignore[attr-defined]
        if self.observer is not None:
            self.observer.call_done(self)

    async def _pump(self) -> None:
        try:
            async for chunk in self._chunks:
                self._take(chunk)
                async with self._changed:
                    self._changed.notify_all()
                if chunk.is_final:
                    break
            if self.final is None:
                self.error = EngineError("The model's stream ended before its final chunk.")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept as the call's typed outcome
            self.error = to_slm_error(exc)
        finally:
            await self._end()
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` holds or the call is over (a pumped call: only its pump moves it on)."""
        if not self.pumped:
            raise RuntimeError("an unpumped call moves only as its replay is read")
        async with self._changed:
            await self._changed.wait_for(lambda: ready() or self.done)

    async def wait_tokens(self, n: int | None) -> None:
        """Until the call has ``n`` tokens (the whole answer when None) or is over."""
        await self.wait(lambda: n is not None and self.tokens >= n)

    async def wait_started(self) -> None:
        """Until the first chunk (a call that starts streaming is alive) or the end."""
        await self.wait(lambda: bool(self.buffer))

    async def cancel(self) -> None:
        """Stop the call; the engine aborts it. A no-op once the call is over."""
        if self.final is not None or self.error is not None or self.cancelled:
            return
        self.cancelled = True
        if self._task is None:
            await self._end()
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        async with self._changed:
            self._changed.notify_all()

    def gate_score(self, cfg: ClusterConfig) -> float:
        gcfg = cfg.strategy.gate
        value = gate.score(gate.features(self.logprobs, self.tokens, q=gcfg.quantile, finished=self.final is not None), gcfg)
        if self.observer is not None:
            self.observer.gated(self, gate.passes(value, gcfg.pass_bar))
        return value

    def replay(self) -> AsyncIterator[GenerationChunk]:
        """Every chunk from the first, the buffered ones then the live ones, up to the final
        chunk; raises the call's error. Closing it early cancels the call."""
        return self._replayed() if self.pumped else self._pulled()

    async def _replayed(self) -> AsyncIterator[GenerationChunk]:
        i = 0
        try:
            while True:
                await self.wait(lambda: len(self.buffer) > i)
                while i < len(self.buffer):
                    chunk = self.buffer[i]
                    i += 1
                    yield chunk
                    if chunk.is_final:
                        return
                if self.error is not None:
                    raise self.error
                if self.cancelled:
                    raise EngineError("The model call was cancelled.")
        finally:
            if self.final is None:
                await self.cancel()

    async def _pulled(self) -> AsyncIterator[GenerationChunk]:
        """An unpumped call's replay: its stream, read here, kept as a pumped call keeps it."""
        try:
            async for chunk in self._chunks:
                self._take(chunk)
                yield chunk
                if chunk.is_final:
                    return
            self.error = EngineError("The model's stream ended before its final chunk.")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - typed once, as a pumped call types it
            self.error = to_slm_error(exc)
        finally:
            if self.final is None and self.error is None:
                self.cancelled = True  # the reader left (client gone, or cancelled) before the end
            await self._end()
        raise self.error

    def record(self, outcome: str) -> costing.CallRecord:
        usage = self.final.usage if self.final is not None else None
        end = self.ended_at if self.ended_at is not None else self.clock()
        return costing.CallRecord(
            model=self.decision.model,
            version=self.decision.version,
            prompt_tokens=usage.prompt_tokens if usage else costing.estimate_tokens("x" * self.prompt_chars),
            completion_tokens=usage.completion_tokens if usage else self.tokens,
            outcome=outcome,
            latency_s=end - self.started_at,
            usage_exact=usage is not None,
        )
