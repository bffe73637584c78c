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
