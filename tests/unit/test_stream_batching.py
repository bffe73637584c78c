from __future__ import annotations

import asyncio

import pytest

from cluster.errors import EngineError
from cluster.types import GenerationChunk, Usage
from deployments.stream_batching import batched_chunks


async def engine(n: int, delay_s: float = 0.0, fail_at: int | None = None, closed: list | None = None):
    try:
        for i in range(n):
            if delay_s:
                await asyncio.sleep(delay_s)
            if i == fail_at:
                raise EngineError("boom")
            yield GenerationChunk(text=f"t{i}")
        yield GenerationChunk(finish_reason="stop", usage=Usage(1, n))
    finally:
        if closed is not None:
            closed.append(True)


async def test_everything_ready_travels_together_in_order() -> None:
    batches = [b async for b in batched_chunks(engine(10), interval_s=0.05)]
    flat = [c for b in batches for c in b]
    assert [c.text for c in flat[:-1]] == [f"t{i}" for i in range(10)] and flat[-1].is_final
    assert len(batches) <= 2


async def test_the_first_chunk_does_not_wait_for_the_interval() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = batched_chunks(engine(5, delay_s=0.02), interval_s=1.0)
    first = await stream.__anext__()
    assert [c.text for c in first] == ["t0"] and loop.time() - start < 0.5
    rest = [c async for b in stream for c in b]
    assert len(rest) == 5


async def test_slow_engine_is_sent_at_most_once_per_interval() -> None:
    batches = [b async for b in batched_chunks(engine(12, delay_s=0.01), interval_s=0.05)]
    assert sum(len(b) for b in batches) == 13
    assert 2 <= len(batches) <= 6


async def test_errors_are_re_raised_after_the_chunks_before_them() -> None:
    got = []
    with pytest.raises(EngineError):
        async for b in batched_chunks(engine(5, fail_at=3), interval_s=0):
            got.extend(c.text for c in b)
    assert got == ["t0", "t1", "t2"]


async def test_closing_early_closes_the_engine_stream() -> None:
    closed: list = []
    stream = batched_chunks(engine(1000, delay_s=0.001, closed=closed), interval_s=0.0)
    await stream.__anext__()
    await stream.aclose()
    assert closed == [True]
