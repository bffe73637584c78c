"""Pull a ModelServer's chunk stream under the gateway's deadlines."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from ray.serve.handle import DeploymentHandle

from cluster.config import GatewayConfig
from cluster.deadlines import StreamDeadlines
from cluster.errors import EngineError, EngineTimeoutError
from cluster.types import GenerationChunk, GenerationRequest


async def timed_chunks(
    handle: DeploymentHandle,
    request: GenerationRequest,
    gw: GatewayConfig,
    clock: Callable[[], float],
) -> AsyncIterator[GenerationChunk]:
    """Yield chunks up to and including the final one.

    Raises ``EngineTimeoutError`` when the first token, a later token or the whole answer
    is late, and ``EngineError`` when the stream ends without a final chunk. However it
    ends early (timeout, error, or the consumer closing this generator), the replica-side
    generation is cancelled, which aborts it in the engine.
    """
    stream = handle.options(stream=True).generate.remote(request)
    deadlines = StreamDeadlines(clock(), gw.request_timeout_s, gw.first_token_timeout_s, gw.stream_idle_timeout_s)
    last_at: float | None = None
    finished = False
    try:
        while True:
            wait, what = deadlines.next_wait(clock(), last_at)
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                batch = await asyncio.wait_for(stream.__anext__(), wait)
            except StopAsyncIteration:
                raise EngineError("The model's stream ended before its final chunk.") from None
            except asyncio.TimeoutError:
                raise EngineTimeoutError(f"The model did not produce the {what} in time.") from None
            last_at = clock()
            for chunk in batch:  # the ModelServer sends chunks in lists
                yield chunk
                if chunk.is_final:
                    finished = True
                    return
    finally:
        if not finished:
            stream.cancel()
