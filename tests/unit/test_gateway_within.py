"""``within``: the one way the gateway waits on a unary handle call under a timeout."""

from __future__ import annotations

import asyncio
from typing import Any, Generator

import pytest

from deployments.gateway.streams import within


class _Response:
    """Awaitable but not a coroutine, like Serve's ``DeploymentResponse``."""

    def __init__(self, value: Any, delay_s: float) -> None:
        self.value, self.delay_s = value, delay_s

    def __await__(self) -> Generator[Any, None, Any]:
        yield from asyncio.sleep(self.delay_s).__await__()
        return self.value


async def test_a_call_that_answers_in_time_gives_its_result() -> None:
    assert await within(_Response({"ready": True}, 0.0), 1.0) == {"ready": True}


async def test_a_call_past_its_timeout_raises_timeout_error_instead_of_hanging() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await within(_Response("late", 30.0), 0.05)
    assert loop.time() - start < 5.0
