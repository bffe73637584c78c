"""Coalesce an engine's chunk stream into small lists before they cross Ray.

Each item a Serve streaming call yields is its own Ray object, about a millisecond of
overhead apiece; sending one per token caps a replica at a few dozen requests per second
on a small machine. So the first chunk goes out at once (time to first token is what users
feel), and later chunks travel together, at most one list per ``interval_s``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from cluster.types import GenerationChunk

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _pump(stream: AsyncIterator[GenerationChunk], queue: asyncio.Queue) -> None:
    try:
        async for chunk in stream:
            queue.put_nowait(chunk)
        queue.put_nowait(_END)
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        queue.put_nowait(_Failure(exc))
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def batched_chunks(stream: AsyncIterator[GenerationChunk], interval_s: float) -> AsyncIterator[list[GenerationChunk]]:
    """Lists of chunks, in order. Engine errors are re-raised here; closing this generator
    cancels the pump, which closes (and so aborts) the engine's stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    pump = asyncio.create_task(_pump(stream, queue))
    first = True
    try:
        while True:
            items = [await queue.get()]
            deadline = loop.time() + (0.0 if first else interval_s)
            first = False
            while items[-1] is not _END and not isinstance(items[-1], _Failure):
                if not queue.empty():
                    items.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            chunks = [c for c in items if isinstance(c, GenerationChunk)]
            if chunks:
                yield chunks
            if isinstance(items[-1], _Failure):
                raise items[-1].exc
            if items[-1] is _END:
                return
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)


class DirectStream:
    """An engine's chunk stream pulled the way a Serve streaming response is: each
    ``await stream.__anext__()`` gives the next chunk as a one-item list, and ``cancel()``
    closes the engine's stream, which aborts the generation.

    The puller's own task runs the engine's generator: no task and queue of its own per
    call (the front door's hottest path, docs/benchmarks.md). That is safe because every
    pull waits under ``asyncio.timeout`` in the puller's task (``streams.within``), and the
    engines hold no task-bound state across a yield (httpx's timeouts are entered and left
    within one read). After the final chunk the generator is closed at once, so its cleanup
    (the engine slot, the upstream response) runs now and not when it is collected."""

    _closing: set[asyncio.Task] = set()  # closes scheduled by cancel(), kept alive until done

    def __init__(self, stream: AsyncIterator[GenerationChunk]) -> None:
        self._stream = stream

    def __aiter__(self) -> "DirectStream":
        return self

    async def __anext__(self) -> list[GenerationChunk]:
        chunk = await self._stream.__anext__()  # the end, or the engine's error, propagate as they are
        if chunk.is_final:
            await self._stream.aclose()  # type: ignore[attr-defined]
        return [chunk]

    def cancel(self) -> None:
        """Close the engine's stream. ``timed_chunks`` calls this from a ``finally`` that
        cannot await, so the close runs as a task; a stream that a timeout or a cancelled
        pull already ended has nothing left to close."""
        gen = self._stream
        if getattr(gen, "ag_frame", True) is None:  # finished: its cleanup has run
            return
        task = asyncio.get_running_loop().create_task(gen.aclose())  # type: ignore[attr-defined]
        DirectStream._closing.add(task)
        task.add_done_callback(_closed)


def _closed(task: asyncio.Task) -> None:
    DirectStream._closing.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a stream that fails while closing has nobody left to tell
