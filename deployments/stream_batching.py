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


class PumpedStream:
    """An engine's chunk stream run by a task of its own, pulled the way a Serve streaming
    response is: ``await stream.__anext__()`` gives every chunk that has arrived (at least
    one) as a list, and ``cancel()`` stops the task, which closes (and so aborts) the
    engine's stream. The task, not the puller, runs the engine's generator: the puller
    wraps each pull in ``asyncio.wait_for``, which runs every step in a new task before
    Python 3.12, and an engine's stream may hold task-bound state (httpx's timeouts)."""

    def __init__(self, stream: AsyncIterator[GenerationChunk]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: object | None = None  # an end or failure that arrived behind chunks
        self._task = asyncio.get_running_loop().create_task(_pump(stream, self._queue))

    def __aiter__(self) -> "PumpedStream":
        return self

    async def __anext__(self) -> list[GenerationChunk]:
        item, self._pending = (self._pending, None) if self._pending is not None else (await self._queue.get(), None)
        if item is _END:
            self._pending = _END  # pulled again after the end: the end again
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._pending = item
            raise item.exc
        batch = [item]
        while not self._queue.empty():
            more = self._queue.get_nowait()
            if not isinstance(more, GenerationChunk):
                self._pending = more
                break
            batch.append(more)
        return batch  # type: ignore[return-value]

    def cancel(self) -> None:
        self._task.cancel()
