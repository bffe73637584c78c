"""vLLM adapter: the V1 ``AsyncLLM`` engine, in-process, behind the ``Engine`` seam.

vLLM is imported only in ``load_vllm_backend`` (called by ``start()``, in a worker thread: it
blocks while the model loads), so this module imports on machines without vLLM or a GPU. The
mapping is pure functions over duck-typed vLLM objects, and the engine object is injectable
(``engine_factory=``), so the tests run on ``tests/fakes/vllm_engine.py``. Chat templating and
tokenisation run on one worker thread per engine (``TokenizerThread``), off the event loop.

API facts relied on (vLLM >= 0.10, checked against current main):
- ``vllm.v1.engine.async_llm.AsyncLLM.from_engine_args(vllm.engine.arg_utils.AsyncEngineArgs(...))``.
- ``AsyncLLM.generate(prompt, sampling_params, request_id)``: an async generator of
  ``vllm.outputs.RequestOutput`` (``.prompt_token_ids``, ``.finished``, ``.outputs[0]``: a
  ``CompletionOutput`` with ``.text``, ``.token_ids``, ``.logprobs`` and ``.finish_reason`` in
  "stop" | "length" | "abort" | "error" | "repetition"). ``prompt`` may be a ``TokensPrompt``
  dict ``{"prompt_token_ids": [...]}``; a text prompt would be encoded with
  ``tokenizer.encode(text)`` (special tokens included) on the caller's event loop, so raw
  prompts (/v1/completions) are encoded that same way on our tokenizer thread and sent as
  token ids too. "abort" reaches us only when the engine itself dropped
  the request (our own aborts close the stream first); it is raised as
  ``EngineUnavailableError`` (503, retryable), never sent as a cut answer with a 200.
- ``SamplingParams.seed`` seeds a ``torch.Generator``; vLLM's OpenAI server bounds it to int64,
  and so do we (a 400 naming ``seed``), since a larger one fails inside the engine core.
- Tensor parallelism above one GPU: the replica reserves ``num_gpus >= tensor_parallel_size``
  whole GPUs on one node, Ray sets ``CUDA_VISIBLE_DEVICES`` to them, and vLLM's multiprocessing
  executor (``distributed_executor_backend="mp"``, pinned here) starts its workers inside that
  reservation. The Ray executor would need a placement group with one GPU bundle per worker,
  which the Serve deployment does not declare (see docs/engines.md).
- ``SamplingParams(output_kind=RequestOutputKind.DELTA)`` (``vllm.sampling_params``): each output
  carries only the new text, token ids and logprobs. Chosen over CUMULATIVE: no quadratic
  copying, and vLLM still holds back text that may begin a stop string, so no delta ever
  carries part of one. ``logprobs=0`` returns the sampled token's logprob only; each position
  is ``{token_id: Logprob(logprob, rank, decoded_token)}``. ``logprobs=k`` (``top_logprobs``)
  adds the k most likely tokens, ranks 1..k, after the sampled token (first, with its own
  rank, once if it is among them); k above the model's ``max_logprobs`` (20 by default) is a
  ``VLLMValidationError`` from ``generate``.
- ``AsyncLLM.abort(request_id)`` takes the caller's id (since 0.16 vLLM suffixes ids internally
  and ``abort(..., internal=False)`` maps them back). ``generate`` also aborts by itself on
  ``GeneratorExit``/``CancelledError``; we still abort explicitly, which is idempotent.
- ``check_health()`` raises ``EngineDeadError`` (``vllm.v1.engine.exceptions``) once the engine
  core died; ``shutdown()`` is synchronous; ``get_tokenizer()`` is synchronous on current vLLM
  and a coroutine on older releases (both handled).
- Request validation raises ``vllm.exceptions.VLLMValidationError`` (a ``ValueError`` on older
  releases, a ``VLLMClientError`` on newer), e.g. "The decoder prompt (length N) is longer than
  the maximum model length of M"; other failures inside ``generate`` arrive wrapped in
  ``EngineGenerateError``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import uuid
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping, Protocol, Sequence

from cluster.capabilities import engine_params, refuse_unsupported
from cluster.config import VLLMEngineConfig
from cluster.errors import EngineError, EngineUnavailableError, SLMError
from cluster.types import (
    EngineCapabilities,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from deployments.engines.common import penalty_kwargs
from deployments.engines.gpu_common import (
    ChatTokenizer,
    ChunkAssembler,
    TokenizerThread,
    check_seed,
    drive_stream,
    has_class_named,
    invalid_request,
    prompt_param,
    request_prompt_ids,
)

_INSTALL_HINT = "pip install 'slm-cluster[vllm]'"

# vLLM's finish reasons -> ours. "repetition" (a repetition detector ended the answer) is a
# natural stop, not a cut. "abort" (the engine dropped the request; we never see our own
# aborts: the stream is closed by then) and "error" are raised by ``finish_reason``.
_FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}


class AsyncLLMLike(Protocol):
    """The part of ``vllm.v1.engine.async_llm.AsyncLLM`` this adapter uses."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[Any]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...

    def get_tokenizer(self) -> Any: ...


@dataclass
class VLLMBackend:
    """A started engine plus the way to build its ``SamplingParams`` from our kwargs."""

    llm: AsyncLLMLike
    make_sampling_params: Callable[[dict[str, Any]], Any]


# --- pure mapping ----------------------------------------------------------------------


def engine_args_kwargs(config: VLLMEngineConfig) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for ``config``; ``extra_engine_args`` win."""
    kwargs: dict[str, Any] = {
        "model": config.model,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype,
        "enforce_eager": config.enforce_eager,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.quantization is not None:
        kwargs["quantization"] = config.quantization
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.tensor_parallel_size > 1:
        # Workers as child processes on the replica's own GPUs; inside a Ray actor vLLM would
        # otherwise pick its Ray executor whenever it finds a placement group.
        kwargs["distributed_executor_backend"] = "mp"
    return {**kwargs, **config.extra_engine_args}


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keyword arguments (without ``output_kind``, which the loader
    pins to DELTA). Unset options are left out so vLLM's defaults apply. A seed outside
    int64 is an ``InvalidRequestError`` naming ``seed``."""
    check_seed(sampling.seed)
    kwargs: dict[str, Any] = {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    if sampling.logprobs:
        # 0: the sampled token's logprob alone; k: also the k most likely tokens per position
        kwargs["logprobs"] = sampling.top_logprobs
    kwargs.update(penalty_kwargs(sampling, bias_keys_as_str=False))  # vLLM's logit_bias takes int token ids
    structured = structured_outputs(sampling.response_format)
    if structured is not None:
        kwargs["structured_outputs"] = structured  # the loader wraps it in StructuredOutputsParams
    return kwargs


def structured_outputs(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's ``StructuredOutputsParams`` fields (vLLM >= 0.12; ``guided_decoding`` before)
    for OpenAI's ``response_format``: ``json_object`` is any JSON object, ``json_schema``
    its schema."""
    if response_format is None or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return {"json_object": True}
    return {"json": response_format["json_schema"].get("schema") or {"type": "object"}}


def token_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any] | None, top: int = 0) -> tuple[TokenLogprob, ...]:
    """One ``TokenLogprob`` per sampled token, from vLLM's per-position ``{id: Logprob}``,
    with the ``top`` most likely tokens of the position (most likely first) as ``top``."""
    if not logprobs:
        return ()
    out = []
    for token_id, position in zip(token_ids, logprobs):
        # The sampled token is always in its position's dict; the fallback only guards
        # against a library change (and an empty dict yields no logprob rather than a crash).
        entry = position.get(token_id) or next(iter(position.values()), None)
        if entry is not None:
            alternatives = _top_alternatives(position, top) if top else ()
            out.append(TokenLogprob(token=entry.decoded_token or "", logprob=float(entry.logprob), top=alternatives))
    return tuple(out)


def _top_alternatives(position: Mapping[int, Any], top: int) -> tuple[tuple[str, float], ...]:
    """The ``top`` most likely tokens of one position. vLLM's dict holds the sampled token
    (first, with its vocabulary rank, which may be above ``top``) and the top-k by rank;
    ordering by logprob leaves out a sampled token that is not among the k, as OpenAI does."""
    best = sorted(position.values(), key=lambda e: float(e.logprob), reverse=True)[:top]
    return tuple((e.decoded_token or "", float(e.logprob)) for e in best)


def finish_reason(reason: str | None) -> FinishReason:
    """Our finish reason for vLLM's. "abort" (the engine dropped the request) is
    ``EngineUnavailableError`` (503, retryable); "error" or anything new is ``EngineError``."""
    if reason == "abort":
        raise EngineUnavailableError("vLLM aborted the request (engine-side abort); retry it")
    mapped = _FINISH.get(str(reason))
    if mapped is None:
        raise EngineError(f"vLLM ended the request with finish_reason={reason!r}")
    return mapped  # type: ignore[return-value]


def translate_error(exc: Exception, *, prompt_param: str = "messages") -> SLMError:
    """The typed error for an exception raised by ``AsyncLLM.generate``; a context-length
    400 names ``prompt_param`` (``prompt`` for a raw prompt)."""
    if isinstance(exc, SLMError):
        return exc
    if has_class_named(exc, "EngineDeadError", "AsyncEngineDeadError"):
        return EngineUnavailableError(f"vLLM engine is dead: {exc}")
    # vLLM's own convention: validation failures are ValueErrors (VLLMValidationError); they
    # come straight from generate(), while its internal failures arrive as EngineGenerateError.
    if has_class_named(exc, "VLLMClientError", "VLLMValidationError") or type(exc) is ValueError:
        return invalid_request(str(exc), prompt_param=prompt_param)
    return EngineError(f"vLLM generation failed: {type(exc).__name__}: {exc}")


class _OutputMapper:
    """Maps one request's DELTA ``RequestOutput``s to chunks and keeps its usage."""

    def __init__(self, *, want_logprobs: bool, prompt_tokens: int, top_logprobs: int = 0) -> None:
        self._want_logprobs = want_logprobs
        self._top = top_logprobs
        self._prompt_tokens = prompt_tokens
        self._completion_tokens = 0
        self._assembler = ChunkAssembler()  # vLLM enforces stop strings itself

    def feed(self, output: Any) -> list[GenerationChunk]:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        self._completion_tokens += len(token_ids)
        if output.prompt_token_ids is not None:
            self._prompt_tokens = len(output.prompt_token_ids)
        logprobs = token_logprobs(token_ids, completion.logprobs, self._top) if self._want_logprobs else ()
        chunk = self._assembler.delta(completion.text, logprobs)
        chunks = [chunk] if chunk is not None else []
        if is_final(output):
            usage = Usage(prompt_tokens=self._prompt_tokens, completion_tokens=self._completion_tokens)
            chunks += self._assembler.final(finish_reason(completion.finish_reason), usage)
        return chunks


def is_final(output: Any) -> bool:
    return bool(output.finished) or output.outputs[0].finish_reason is not None


# --- the adapter -----------------------------------------------------------------------


def load_vllm_backend(config: VLLMEngineConfig) -> VLLMBackend:
    """Start a real ``AsyncLLM`` (loads the model on the GPU; slow, blocking)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VLLMSamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise EngineUnavailableError(f"vLLM is not installed ({exc}); {_INSTALL_HINT}") from exc
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args_kwargs(config)))
    def make(kw: dict[str, Any]) -> Any:
        if "structured_outputs" in kw:
            from vllm.sampling_params import StructuredOutputsParams

            kw = {**kw, "structured_outputs": StructuredOutputsParams(**kw["structured_outputs"])}
        return VLLMSamplingParams(**kw, output_kind=RequestOutputKind.DELTA)

    return VLLMBackend(llm=llm, make_sampling_params=make)


class VLLMEngine:
    """One model version on vLLM's ``AsyncLLM``. See the module docstring for the API used.

    ``engine_factory`` builds the backend in ``start()`` (in a worker thread); the default
    starts real vLLM, tests pass ``tests/fakes/vllm_engine.fake_vllm_backend``.
    """

    capabilities = EngineCapabilities(streaming=True, logprobs=True, raw_prompt=True, params=engine_params("vllm"))

    def __init__(
        self,
        config: VLLMEngineConfig,
        *,
        system_prompt: str | None = None,
        engine_factory: Callable[[VLLMEngineConfig], VLLMBackend] = load_vllm_backend,
    ) -> None:
        self.config = config
        self.system_prompt = system_prompt
        self._factory = engine_factory
        self._backend: VLLMBackend | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._tokenizer_thread: TokenizerThread | None = None

    async def start(self) -> None:
        """Load the model. Raises ``EngineUnavailableError`` when vLLM is missing and
        ``EngineError`` when it fails to start; never leaves a half-started engine."""
        if self._backend is not None:
            return
        try:
            backend = await asyncio.to_thread(self._factory, self.config)
        except SLMError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed to start {self.config.model!r}: {exc}") from exc
        try:
            tokenizer = backend.llm.get_tokenizer()
            if inspect.isawaitable(tokenizer):
                tokenizer = await tokenizer
        except Exception as exc:
            with suppress(Exception):
                backend.llm.shutdown()
            raise EngineError(f"vLLM started without a usable tokenizer: {exc}") from exc
        self._tokenizer_thread = TokenizerThread("vllm-tokenizer")
        self._backend, self._tokenizer = backend, tokenizer

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Text chunks in order, then one final chunk with finish reason and usage. A raw
        prompt (``request.prompt``) is sent as is, without the chat template or the system
        prompt. Closing or cancelling the iterator aborts the request in vLLM."""
        backend, tokenizer = self._require_started()
        refuse_unsupported(self.capabilities, request, "vllm")
        translate = functools.partial(translate_error, prompt_param=prompt_param(request))
        try:  # vLLM validates sampling options when the object is built
            params = backend.make_sampling_params(sampling_kwargs(request.sampling))
        except Exception as exc:
            raise translate(exc) from exc
        assert self._tokenizer_thread is not None
        # A raw prompt (/v1/completions) is the client's text as is: no template, no system prompt.
        prompt_ids = await self._tokenizer_thread.run(request_prompt_ids, tokenizer, request, self.system_prompt)
        engine_id = uuid.uuid4().hex  # ours and unique per attempt, never the client's id
        sampling = request.sampling
        mapper = _OutputMapper(want_logprobs=sampling.logprobs, prompt_tokens=len(prompt_ids), top_logprobs=sampling.top_logprobs)

        async def open_stream() -> AsyncIterator[Any]:
            return backend.llm.generate({"prompt_token_ids": prompt_ids}, params, engine_id)

        async def abort() -> None:
            await backend.llm.abort(engine_id)

        outputs = drive_stream(open_stream, is_final=is_final, abort=abort, translate=translate)
        try:
            async for output in outputs:
                for chunk in mapper.feed(output):
                    yield chunk
        finally:
            await outputs.aclose()  # runs drive_stream's abort when we stop early

    async def check_health(self) -> None:
        """Raises ``EngineUnavailableError`` when not started or when vLLM reports itself dead."""
        backend, _ = self._require_started()
        try:
            await backend.llm.check_health()
        except Exception as exc:
            raise EngineUnavailableError(f"vLLM engine is unhealthy: {type(exc).__name__}: {exc}") from exc

    async def shutdown(self) -> None:
        """Stop the engine and free the GPU. Idempotent; safe before ``start()``. A failure
        to stop is raised once as ``EngineError``; the engine counts as stopped either way."""
        backend, self._backend, self._tokenizer = self._backend, None, None
        thread, self._tokenizer_thread = self._tokenizer_thread, None
        if thread is not None:
            thread.close()
        if backend is None:
            return
        try:
            backend.llm.shutdown()
        except Exception as exc:
            raise EngineError(f"vLLM shutdown failed: {exc}") from exc

    def _require_started(self) -> tuple[VLLMBackend, ChatTokenizer]:
        if self._backend is None or self._tokenizer is None:
            raise EngineUnavailableError("vLLM engine is not started")
        return self._backend, self._tokenizer
