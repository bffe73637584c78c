"""The ``hf`` engine's continuous-batching decode loop.

One ``DecodeLoop`` per engine owns the model. Each step it drops finished or abandoned rows,
decodes one token for every running sequence in a single forward pass over the shared KV
cache, and prefills newly admitted requests (left-padded together) whose cache rows are then
merged into the running batch: the shorter cache is left-padded with masked zeros along the
sequence axis so every row keeps its own positions. Columns that no row uses any more are
trimmed from the left. Forward passes run on the engine's single worker thread (never on the
event loop), so the replica stays responsive and compute is serialized.

The loop deals in token ids only; detokenizing and stop strings belong to the consumer
(``HFEngine.generate``), which marks a sequence ``done`` to have it dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F

from cluster.errors import EngineError, EngineUnavailableError, SLMError
from deployments.engines.hf_loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class FinishedEvent:
    reason: str  # "stop" (an EOS / end-of-turn token) or "length" (max_tokens)
    completion_tokens: int  # tokens the model produced, the EOS token included


@dataclass(frozen=True)
class FailedEvent:
    error: SLMError


Event = Union[TokenEvent, FinishedEvent, FailedEvent]


@dataclass(eq=False)
class Sequence:
    """One request inside the loop. ``done`` is set by the loop when it finished and by the
    consumer when it stops listening; either way the row leaves the batch at the next step."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    generated: int = 0
    done: bool = False


@dataclass
class BatchStats:
    """Counters for tests and metrics; only the event loop thread writes them."""

    admitted: int = 0  # requests that entered the running batch
    completed: int = 0  # streams that ended with a final chunk (counted by HFEngine.generate)
    aborted: int = 0  # streams the caller closed early (counted by HFEngine.generate)
    failed: int = 0  # requests failed by a loop failure or shutdown
    prefill_passes: int = 0
    decode_passes: int = 0
    tokens: int = 0
    max_decode_rows: int = 0  # most sequences decoded together in one forward pass
    joins: int = 0  # prefills merged into an already running batch (continuous batching)
    active_rows: int = 0  # sequences in the running batch after the last step


class _Batch:
    """The running batch's tensors: KV cache, 2-D attention mask (1 = real token), the next
    position and the last token of each row. Rows are in the loop's ``active`` order."""

    def __init__(self, cache: object, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> None:
        self.cache, self.mask, self.positions, self.last = cache, mask, positions, last

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        self._trim_left()

    def _trim_left(self) -> None:
        # After long sequences leave, the left columns may be padding for every row; dropping
        # them keeps attention cost proportional to the longest live sequence.
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(other.mask, width, -1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]  # F.pad lists (left, right) from the last dim backwards
    return F.pad(tensor, pad)


@dataclass(frozen=True)
class _StepResult:
    tokens: list[tuple[int, float]]  # one (token id, logprob) per row, in the new active order
    decode_rows: int
    prefill_rows: int
    joined: bool  # the prefilled rows were merged into a running batch


class DecodeLoop:
    """Admits, prefills, decodes and retires sequences; see the module docstring."""

    def __init__(self, loaded: LoadedModel, *, executor: Executor, max_batch_size: int, batch_wait_s: float, stats: BatchStats) -> None:
        self._loaded = loaded
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._batch_wait_s = batch_wait_s
        self.stats = stats
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._batch: _Batch | None = None
        self._wake = asyncio.Event()
        self.failure: BaseException | None = None

    def submit(self, seq: Sequence) -> None:
        self._waiting.append(seq)
        self._wake.set()

    async def run(self) -> None:
        """Runs until cancelled. On cancellation every waiting and running request fails with
        ``EngineUnavailableError``; on any other exception with ``EngineError``, the cause is
        kept in ``failure`` and the loop ends (the engine reports itself unhealthy)."""
        try:
            while True:
                if not self._active and not self._has_live_waiting():
                    await self._idle()
                await self._step()
        except asyncio.CancelledError:
            self._fail_all(lambda: EngineUnavailableError("hf engine shut down"))
            raise
        except Exception as exc:  # noqa: BLE001 - any loop failure must reach every caller
            log.exception("hf decode loop failed")
            self.failure = exc
            message = f"hf engine decode loop failed: {type(exc).__name__}: {exc}"
            self._fail_all(lambda: EngineError(message))

    async def _idle(self) -> None:
        self._waiting = collections.deque(s for s in self._waiting if not s.done)
        self._wake.clear()
        await self._wake.wait()
        if self._batch_wait_s:
            # A new batch waits a moment so requests arriving together start together.
            await asyncio.sleep(self._batch_wait_s)

    def _has_live_waiting(self) -> bool:
        return any(not s.done for s in self._waiting)

    async def _step(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.done]
        kept = [self._active[i] for i in keep]
        newcomers = self._admit(self._max_batch_size - len(kept))
        self.stats.admitted += len(newcomers)
        # The new row order, set before computing so that a failure or shutdown during the
        # step reaches the newcomers too (they have already left the waiting queue).
        self._active = kept + newcomers
        running = asyncio.get_running_loop()
        result = await running.run_in_executor(self._executor, self._compute, keep, kept, newcomers)
        self._record(result)
        for seq, (token_id, logprob) in zip(self._active, result.tokens):
            self._deliver(seq, token_id, logprob)
        self.stats.active_rows = sum(not s.done for s in self._active)

    def _admit(self, room: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        while self._waiting and len(admitted) < room:
            seq = self._waiting.popleft()
            if not seq.done:  # the caller gave up while it waited
                admitted.append(seq)
        return admitted

    def _record(self, result: _StepResult) -> None:
        self.stats.decode_passes += bool(result.decode_rows)
        self.stats.prefill_passes += bool(result.prefill_rows)
        self.stats.joins += result.joined
        self.stats.tokens += len(result.tokens)
        self.stats.max_decode_rows = max(self.stats.max_decode_rows, result.decode_rows)

    def _deliver(self, seq: Sequence, token_id: int, logprob: float) -> None:
        if seq.done:  # the consumer left during this step; its row goes next step
            return
        seq.generated += 1
        if token_id in self._loaded.stop_token_ids:
            self._finish(seq, "stop")
            return
        seq.events.put_nowait(TokenEvent(token_id, logprob))
        if seq.generated >= seq.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.done = True
        seq.events.put_nowait(FinishedEvent(reason, seq.generated))

    def _fail_all(self, make_error: Callable[[], SLMError]) -> None:
        # One error object per caller: each raise writes its own traceback onto the object.
        for seq in [*self._active, *self._waiting]:
            if not seq.done:
                seq.done = True
                self.stats.failed += 1
                seq.events.put_nowait(FailedEvent(make_error()))
        self._active, self._waiting, self._batch = [], collections.deque(), None

    # --- on the worker thread ------------------------------------------------------------

    def _compute(self, keep: list[int], kept: list[Sequence], newcomers: list[Sequence]) -> _StepResult:
        with torch.inference_mode():
            tokens: list[tuple[int, float]] = []
            if self._batch is not None and len(keep) < self._batch.mask.shape[0]:
                if keep:
                    self._batch.select(keep)
                else:
                    self._batch = None
            if self._batch is not None:
                tokens += self._decode(self._batch, kept)
            joined = bool(newcomers) and self._batch is not None
            if newcomers:
                fresh, first = self._prefill(newcomers)
                tokens += first
                if self._batch is None:
                    self._batch = fresh
                else:
                    self._batch.merge(fresh)
            return _StepResult(tokens, decode_rows=len(kept), prefill_rows=len(newcomers), joined=joined)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object) -> torch.Tensor:
        kwargs = {self._loaded.cache_kwarg: cache}
        out = self._loaded.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )
        return out.logits[:, -1, :]

    def _decode(self, batch: _Batch, seqs: list[Sequence]) -> list[tuple[int, float]]:
        batch.mask = F.pad(batch.mask, (0, 1), value=1)  # the column of the token fed now
        logits = self._forward(batch.last[:, None], batch.mask, batch.positions[:, None], batch.cache)
        batch.positions = batch.positions + 1
        chosen = sample(logits, seqs)
        batch.last = torch.tensor([t for t, _ in chosen], device=batch.last.device)
        return chosen

    def _prefill(self, seqs: list[Sequence]) -> tuple[_Batch, list[tuple[int, float]]]:
        from transformers import DynamicCache

        device = self._loaded.device
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self._loaded.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):  # left padding: every prompt ends at the last column
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._loaded.model.config)
        logits = self._forward(ids, mask, positions, cache)
        chosen = sample(logits, seqs)
        last = torch.tensor([t for t, _ in chosen], device=device)
        return _Batch(cache, mask, positions[:, -1] + 1, last), chosen


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, float]]:
    """One (token id, logprob) per row: argmax when the row's temperature is 0, else a draw
    from the temperature-scaled, top-p-truncated distribution with the row's generator.
    The logprob is under the model's raw distribution (log_softmax of the unscaled logits),
    whatever the sampling settings, so it means the same for greedy and sampled tokens."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    ids = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        if seq.temperature > 0:
            ids[row] = _draw(logits[row], seq.temperature, seq.top_p, seq.generator)
    chosen = logprobs.gather(1, torch.tensor(ids, device=logits.device)[:, None]).squeeze(1).tolist()
    return list(zip(ids, chosen))


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
