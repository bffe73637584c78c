"""The ``hf`` engine: transformers on CPU or GPU, with continuous batching.

``start()`` loads the model on the engine's single worker thread and starts one decode loop
task (``hf_batcher.DecodeLoop``) that owns the model and decodes every running request
together, one token per forward pass. ``generate()`` renders the chat template, queues the
request, and turns the token ids the loop delivers into text: incremental detokenizing
(multi-byte characters are never split) and stop strings happen here, on the caller's side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

import torch

from cluster.capabilities import engine_params, refuse_unsupported
from cluster.config import HFEngineConfig
from cluster.errors import ContextLengthExceededError, EngineError, EngineUnavailableError, InvalidRequestError, SLMError
from cluster.types import EngineCapabilities, GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob, Usage
from deployments.engines.common import StopMatcher, messages_as_dicts, with_system_prompt
from deployments.engines.hf_batcher import BatchStats, DecodeLoop, FailedEvent, FinishedEvent, Sequence
from deployments.engines.hf_loading import LoadedModel, load_model

Loader = Callable[[HFEngineConfig], LoadedModel]


class HFEngine:
    """An ``Engine`` over a local transformers model (see the module docstring).

    ``loader`` (default ``hf_loading.load_model``) is called once by ``start()`` on the
    worker thread; tests pass one that shares an already loaded model. ``stats`` counts
    admitted, completed, aborted and failed requests and the batch sizes of forward passes.
    """

    capabilities = EngineCapabilities(streaming=True, logprobs=True, raw_prompt=True, params=engine_params("hf"))

    def __init__(self, config: HFEngineConfig, *, system_prompt: str | None = None, loader: Loader = load_model) -> None:
        self.config = config
        self.system_prompt = system_prompt
        self.stats = BatchStats()
        self._loader = loader
        self._loaded: LoadedModel | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._decoder: DecodeLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Load model and tokenizer off the event loop and start the decode loop. Raises
        ``ArtifactError`` for missing artifacts, ``EngineError`` for other load failures;
        the engine is then not started. Calling it again once started does nothing."""
        if self._closed:
            raise EngineUnavailableError("hf engine was shut down; create a new one")
        if self._task is not None:
            return
        # One dedicated worker thread for loading and every forward pass: compute is
        # serialized, and torch's per-thread settings are made once, where they apply.
        executor = ThreadPoolExecutor(1, thread_name_prefix="hf-engine", initializer=_init_worker, initargs=(self.config.torch_threads,))
        loaded: LoadedModel | None = None
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(executor, self._load)
        finally:
            if loaded is None:  # failed or cancelled: leave nothing running
                executor.shutdown(wait=False)
        self._loaded, self._executor = loaded, executor
        self._decoder = DecodeLoop(
            loaded,
            executor=executor,
            max_batch_size=self.config.max_batch_size,
            batch_wait_s=self.config.batch_wait_ms / 1000,
            stats=self.stats,
        )
        self._task = asyncio.create_task(self._decoder.run(), name="hf-decode-loop")

    async def check_health(self) -> None:
        """Raises ``EngineUnavailableError`` when not started, shut down, or the loop died."""
        if self._closed or self._task is None:
            raise EngineUnavailableError("hf engine is not running")
        if self._task.done():
            cause = self._decoder.failure if self._decoder else None
            raise EngineUnavailableError(f"hf engine decode loop stopped: {cause!r}")

    async def shutdown(self) -> None:
        """Stop the loop (waiting and running requests fail with ``EngineUnavailableError``),
        wait for a forward pass in flight to end, release the model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            # The worker is single-threaded: a no-op queued behind the current forward pass
            # returns only once that pass has finished, so no compute outlives shutdown().
            await asyncio.get_running_loop().run_in_executor(self._executor, _noop)
            self._executor.shutdown(wait=False)
        self._executor, self._decoder, self._loaded = None, None, None

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: the chat template over the messages (the version's
        system prompt first unless the request has one), with the assistant turn opened;
        or a raw ``request.prompt`` tokenized as is.
        Raises ``ContextLengthExceededError`` (param ``messages``) when the prompt plus
        ``max_tokens`` does not fit the context, ``InvalidRequestError`` when the template
        rejects the messages."""
        loaded = self._require_loaded()
        if request.prompt is not None:  # /v1/completions: the raw text, no template, no system prompt
            ids = list(loaded.tokenizer.encode(request.prompt))
        else:
            ids = self._template_ids(loaded, request)
        limit = self._context_limit()
        if len(ids) + request.sampling.max_tokens > limit:
            raise ContextLengthExceededError(
                f"prompt of {len(ids)} tokens plus max_tokens {request.sampling.max_tokens} exceeds the context of {limit} tokens",
                param="messages" if request.prompt is None else "prompt",
            )
        return ids

    def _template_ids(self, loaded: LoadedModel, request: GenerationRequest) -> list[int]:
        messages = messages_as_dicts(with_system_prompt(request, self.system_prompt))
        from jinja2 import TemplateError

        try:
            rendered = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except TemplateError as err:
            raise InvalidRequestError(f"the model's chat template rejected the messages: {err}", param="messages") from err
        return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer; see ``cluster.protocols.Engine``. Greedy at temperature 0,
        else temperature and top-p sampling seeded by ``sampling.seed``. Logprobs are under
        the model's unscaled distribution. ``usage.completion_tokens`` counts every token
        the model produced for the request, an ending EOS token included."""
        decoder = self._require_decoder()
        refuse_unsupported(self.capabilities, request, "hf")
        _validate(request.sampling)
        prompt_ids = self.encode(request)
        seq = Sequence(
            prompt_ids=prompt_ids,
            max_tokens=request.sampling.max_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            generator=self._generator(request.sampling),
        )
        decoder.submit(seq)
        stream = TextStream(self._require_loaded().tokenizer, request.sampling)
        outcome = "aborted"  # unless the stream reaches its final chunk or fails
        try:
            while True:
                event = await seq.events.get()
                if isinstance(event, FailedEvent):
                    outcome = "failed"
                    raise event.error
                if isinstance(event, FinishedEvent):
                    chunk, hit = stream.flush()
                    if chunk is not None:
                        yield chunk
                    outcome = "completed"
                    reason = "stop" if hit else event.reason
                    yield GenerationChunk(finish_reason=reason, usage=Usage(len(prompt_ids), event.completion_tokens))
                    return
                chunk, hit = stream.add(event.token_id, event.logprob)
                if chunk is not None:
                    yield chunk
                if hit:
                    outcome = "completed"
                    seq.done = True  # free the row now, not when the caller next pulls
                    yield GenerationChunk(finish_reason="stop", usage=Usage(len(prompt_ids), stream.tokens))
                    return
        finally:
            seq.done = True  # whatever happened, the loop drops this row at its next step
            if outcome == "completed":
                self.stats.completed += 1
            elif outcome == "aborted":
                self.stats.aborted += 1

    def _load(self) -> LoadedModel:
        try:
            return self._loader(self.config)
        except SLMError:
            raise
        except Exception as err:  # noqa: BLE001 - an untyped load failure is still the engine's failure
            raise EngineError(f"hf engine failed to load its model: {type(err).__name__}: {err}") from err

    def _generator(self, sampling: SamplingParams) -> torch.Generator | None:
        if sampling.temperature == 0:
            return None
        loaded = self._require_loaded()
        generator = torch.Generator(device=loaded.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        return generator

    def _context_limit(self) -> int:
        model_limit = self._require_loaded().max_positions
        return min(self.config.max_context_tokens, model_limit) if model_limit else self.config.max_context_tokens

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineUnavailableError("hf engine is not started")
        return self._loaded

    def _require_decoder(self) -> DecodeLoop:
        if self._closed or self._decoder is None or self._task is None or self._task.done():
            raise EngineUnavailableError("hf engine is not running")
        return self._decoder


class IncrementalDetokenizer:
    """Turns token ids into text as they come, one token at a time.

    Decodes a short window (the tokens since the previous emit, plus the ones before them
    for context, so leading spaces come out right) and emits only the new suffix; a suffix
    ending in U+FFFD is an incomplete multi-byte character and is held until the bytes
    that complete it arrive (``flush`` emits whatever is left). Linear in the length.
    """

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: context only, already emitted
        self._read = 0  # first token not yet emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class TextStream:
    """Token ids to text chunks for one request: detokenizes, holds back possible stop
    strings, and attaches each token's logprob to the chunk its text goes out in."""

    def __init__(self, tokenizer: object, sampling: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(sampling.stop)
        self._want_logprobs = sampling.logprobs
        self._pending: list[TokenLogprob] = []
        self.tokens = 0

    def add(self, token_id: int, logprob: float) -> tuple[GenerationChunk | None, bool]:
        """(chunk to send or None, whether a stop string was hit)."""
        self.tokens += 1
        if self._want_logprobs:
            self._pending.append(TokenLogprob(token=self._tokenizer.decode([token_id]), logprob=logprob))
        text, hit = self._stops.feed(self._detokenizer.add(token_id))
        return self._chunk(text), hit

    def flush(self) -> tuple[GenerationChunk | None, bool]:
        """The held-back text at the end of the stream (cut at a stop string if one completes)."""
        text, hit = self._stops.feed(self._detokenizer.flush())
        if not hit:
            text += self._stops.flush()
        return self._chunk(text), hit

    def _chunk(self, text: str) -> GenerationChunk | None:
        if not text:
            return None  # logprobs wait for the chunk that carries their text
        chunk = GenerationChunk(text=text, logprobs=tuple(self._pending))
        self._pending = []
        return chunk


def _validate(sampling: SamplingParams) -> None:
    if sampling.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
    if sampling.temperature < 0:
        raise InvalidRequestError("temperature must not be negative", param="temperature")
    if not 0 < sampling.top_p <= 1:
        raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _noop() -> None:
    return None
