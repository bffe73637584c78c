"""Merge the batches that queue up while a CPU model is busy into its next call.

Why: Ray Serve's ``@serve.batch`` (2.60) forms the next batch as soon as its wait window
closes, before the running batch has finished; the batches it forms while the model is
busy then wait their turn one by one. With a CPU model that takes tens of milliseconds a
call and a 2 ms window, a replica under 32 concurrent requests ran batches of about two.
``BusyMerger`` runs one model call at a time in a worker thread and hands every batch
that arrived meanwhile to the next call together (up to ``max_items``), so the batch size
follows the load: one request alone runs at once, a crowd runs as one matrix multiply.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BusyMerger(Generic[T, R]):
    """``await run(items)`` -> ``fn``'s results for ``items``, in order.

    ``fn`` is synchronous (it runs in a thread so the event loop keeps taking requests)
    and must return one result per item. Its exception goes to every caller whose items
    were in that call; the next call still runs. A caller cancelled while waiting does
    not stop a call that has started (a CPU forward pass cannot be interrupted); its
    results are dropped.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self._fn = fn
        self.max_items = max_items
        self._pending: deque[tuple[list[T], asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None
        self.calls = 0  # model calls made, the items they carried and the seconds they took
        self.items = 0
        self.busy_s = 0.0

    async def run(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((list(items), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[T], asyncio.Future]]:
        taken: list[tuple[list[T], asyncio.Future]] = []
        count = 0
        while self._pending:
            items, future = self._pending[0]
            if future.done():  # its caller was cancelled before the call started
                self._pending.popleft()
                continue
            # A batch is never split, so a caller's items share one call; the first one
            # always goes, even if it alone exceeds max_items.
            if taken and count + len(items) > self.max_items:
                break
            taken.append(self._pending.popleft())
            count += len(items)
        return taken

    async def _drain(self) -> None:
        while self._pending:
            taken = self._take()
            if not taken:
                continue
            flat = [item for items, _ in taken for item in items]
            try:
                results = await self._call(flat)
            except Exception as exc:  # noqa: BLE001 - delivered to the callers it concerns
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in taken:
                if not future.done():
                    future.set_result(results[start : start + len(items)])
                start += len(items)

    async def _call(self, flat: list[T]) -> list[R]:
        self.calls += 1
        self.items += len(flat)
        started = time.perf_counter()
        try:
            results = list(await asyncio.to_thread(self._fn, flat))
        finally:
            self.busy_s += time.perf_counter() - started
        if len(results) != len(flat):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(flat)} items")
        return results
