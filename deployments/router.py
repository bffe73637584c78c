"""Router deployment: batches route requests (``@serve.batch``) through a RouterModel.

``@serve.batch`` gathers concurrent requests; ``BusyMerger`` then joins the batches that
Serve forms while the model is busy into its next call (see ``busy_merge.py`` for why),
so one embedder pass scores everything that queued during the previous one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from ray import serve

from cluster.config import RouterConfig
from cluster.types import RouteQuery, RouteScores
from deployments.busy_merge import BusyMerger
from deployments.gateway.metrics import RouterMetrics
from router_models import create_router_model


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.model = create_router_model(config)
        # Loading (and any artifact check) happens here, so a bad artifact fails the
        # deployment at start, never at the first request.
        self.model.load()
        self.metrics = RouterMetrics()
        self.merger: BusyMerger[str | RouteQuery, RouteScores] = BusyMerger(self._score, max_items=config.max_batch_size)
        self.route_batch.set_max_batch_size(config.max_batch_size)
        self.route_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.embedder = self._standard_embedder(config)
        self._embed_lock = asyncio.Lock()

    @staticmethod
    def _standard_embedder(config: RouterConfig) -> Any:
        """The embedder /v1/embeddings serves: the stock all-MiniLM-L6-v2 (float32, its
        first 256 tokens, as sentence-transformers truncates), not the router's copy, whose
        layers the trained artifact tunes for routing and whose window keeps head and tail.
        None under the heuristic router, which loads no embedder (docs/endpoints.md)."""
        if config.kind != "trained":
            return None
        from router_models.embedder import Embedder

        return Embedder(max_tokens=256, head_tokens=None, context_tokens=0, threads=config.torch_threads, dtype="float32").load()

    # max_batch_size and the wait are reset from config in __init__. Many Serve batches may
    # wait on the merger at once (it runs one model call at a time): the concurrency cap
    # only bounds how many are queued, and max_ongoing_requests bounds that already.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=1024)
    async def route_batch(self, texts: Sequence[str | RouteQuery]) -> list[RouteScores]:
        return await self.merger.run(list(texts))

    def _score(self, batch: list[str | RouteQuery]) -> list[RouteScores]:
        # One model call (in the merger's worker thread): its latency and batch size.
        started = time.perf_counter()
        scores = self.model.score(batch)
        self.metrics.batch_done(len(batch), time.perf_counter() - started)
        return scores

    def batch_stats(self) -> dict[str, float]:
        """Model calls, the requests they scored and the seconds they took, since start."""
        return {"calls": self.merger.calls, "items": self.merger.items, "busy_s": self.merger.busy_s}

    async def route(self, text: str | RouteQuery) -> RouteScores:
        return await self.route_batch(text)

    async def embed(self, texts: list[str]) -> dict[str, Any]:
        """Sentence embeddings of ``texts`` (unit-norm float32 rows, 384 wide) and the tokens
        read (``prompt_tokens``), for /v1/embeddings. One call at a time, off the event loop,
        so routing keeps flowing; the gateway bounds the batch (cluster.openai_endpoints)."""
        if self.embedder is None:
            from cluster.errors import ModelNotFoundError

            raise ModelNotFoundError("router-embedder is not available: embeddings need router.kind: trained.", param="model")
        async with self._embed_lock:
            return await asyncio.to_thread(self._embed, texts)

    def _embed(self, texts: list[str]) -> dict[str, Any]:
        tokens = sum(len(ids) for ids in self.embedder.token_ids(texts))
        return {"embeddings": self.embedder.embed(texts), "prompt_tokens": tokens}
