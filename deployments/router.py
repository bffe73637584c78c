"""Router deployment: batches route requests (``@serve.batch``) through a RouterModel."""

from __future__ import annotations

import asyncio
from typing import Sequence

from ray import serve

from cluster.config import RouterConfig
from cluster.types import RouteScores
from router_models import create_router_model


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.model = create_router_model(config)
        # Loading (and any artifact check) happens here, so a bad artifact fails the
        # deployment at start, never at the first request.
        self.model.load()
        self.route_batch.set_max_batch_size(config.max_batch_size)
        self.route_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # both reset from config in __init__
    async def route_batch(self, texts: Sequence[str]) -> list[RouteScores]:
        # score() is synchronous CPU work; a thread keeps the replica's loop (and the
        # batch queue) responsive while a trained model runs.
        return await asyncio.to_thread(self.model.score, list(texts))

    async def route(self, text: str) -> RouteScores:
        return await self.route_batch(text)
