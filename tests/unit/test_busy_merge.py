"""BusyMerger: batches that arrive while the model is busy ride its next call together."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.busy_merge import BusyMerger


class GatedModel:
    """A synchronous model whose first call blocks until released, recording every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(10)
        return [f"scored:{x}" for x in items]


async def _busy(max_items: int, first: list[str]) -> tuple[GatedModel, BusyMerger, asyncio.Task]:
    """A merger whose model is stuck in its first call (on ``first``) until released."""
    model = GatedModel()
    merger = BusyMerger(model, max_items=max_items)
    task = asyncio.create_task(merger.run(first))
    assert await asyncio.to_thread(model.started.wait, 10)
    return model, merger, task


def test_batches_queued_during_a_call_are_merged_into_the_next_one() -> None:
    async def scenario() -> None:
        model, merger, first = await _busy(32, ["a"])
        queued = [asyncio.create_task(merger.run([f"b{i}", f"c{i}"])) for i in range(5)]
        await asyncio.sleep(0.01)
        model.release.set()
        assert await first == ["scored:a"]
        for i, task in enumerate(queued):
            assert await task == [f"scored:b{i}", f"scored:c{i}"]
        assert model.calls == [["a"], [x for i in range(5) for x in (f"b{i}", f"c{i}")]]
        assert (merger.calls, merger.items) == (2, 11)

    asyncio.run(scenario())


def test_max_items_caps_a_call_without_splitting_a_batch() -> None:
    async def scenario() -> None:
        model, merger, first = await _busy(4, ["x"])
        queued = [asyncio.create_task(merger.run(batch)) for batch in (["a", "b", "c"], ["d", "e"], ["f"], ["g", "h", "i", "j", "k"])]
        await asyncio.sleep(0.01)
        model.release.set()
        await first
        results = [await t for t in queued]
        assert results[3] == [f"scored:{x}" for x in "ghijk"]
        # ["d","e"] does not fit beside ["a","b","c"]; the 5-item batch runs alone.
        assert model.calls[1:] == [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i", "j", "k"]]

    asyncio.run(scenario())


def test_an_error_reaches_the_callers_of_that_call_only() -> None:
    def model(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("cannot score")
        return items

    async def scenario() -> None:
        merger = BusyMerger(model, max_items=1)
        bad, good = await asyncio.gather(merger.run(["bad"]), merger.run(["good"]), return_exceptions=True)
        assert isinstance(bad, ValueError) and good == ["good"]

    asyncio.run(scenario())


def test_a_wrong_result_count_is_an_error_not_a_misaligned_answer() -> None:
    async def scenario() -> None:
        merger = BusyMerger(lambda items: items[:-1], max_items=8)
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await merger.run(["a", "b"])

    asyncio.run(scenario())


def test_a_cancelled_waiter_is_skipped_and_the_others_still_get_answers() -> None:
    async def scenario() -> None:
        model, merger, first = await _busy(32, ["a"])
        gone = asyncio.create_task(merger.run(["gone"]))
        kept = asyncio.create_task(merger.run(["kept"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        assert await first == ["scored:a"] and await kept == ["scored:kept"]
        assert model.calls == [["a"], ["kept"]]

    asyncio.run(scenario())


def test_max_items_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BusyMerger(lambda items: items, max_items=0)
