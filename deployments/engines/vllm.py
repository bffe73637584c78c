"""vLLM adapter: the V1 ``AsyncLLM`` engine, in-process, behind the ``Engine`` seam.

vLLM is imported only in ``load_vllm_backend`` (called by ``start()``, in a worker thread: it
blocks while the model loads), so this module imports on machines without vLLM or a GPU. The
mapping is pure functions over duck-typed vLLM objects, and the engine object is injectable
(``engine_factory=``), so the tests run on ``tests/fakes/vllm_engine.py``. Chat templating and
tokenisation run on one worker thread per engine (``TokenizerThread``), off the event loop.

API facts relied on (vLLM >= 0.10, checked against current main; the pure mapping is in
``deployments/engines/vllm_mapping.py``):
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
- ``SamplingParams(n=k)`` (checked against vLLM main, ``vllm/v1/engine/parallel_sampling.py``
  and ``vllm/outputs.py``): ``AsyncLLM`` runs k child requests (``{i}_{request_id}``, seed + i
  each when seeded) and streams them through one collector. In DELTA mode each
  ``RequestOutput`` holds the ``CompletionOutput``s of the children that produced something
  since the consumer last read (``RequestOutput.add`` merges queued deltas by ``.index``), so
  a choice can be missing from an output; a child's ``finish_reason`` arrives when that child
  ends, ``finished`` only when the last one has; a finished child is not sent again.
  ``abort(request_id)`` aborts the children too.
- Tool calling (``tool_parser`` in the config): vLLM's ``ToolParserManager.get_tool_parser(name)``
  (``vllm.tool_parsers`` on current main; ``vllm.entrypoints.openai.tool_parsers`` up to 0.11)
  gives a ``ToolParser`` class; one instance per choice (they keep per-answer state) reads the
  deltas with ``extract_tool_calls_streaming(...)`` and a ``ChatCompletionRequest``
  (``vllm.entrypoints.openai.chat_completion.protocol`` on main, ``...openai.protocol`` before)
  built from the request's tools. ``adjust_request`` may ask for ``skip_special_tokens=False``.
  The tools also go to the chat template (``tools=``). See ``deployments/engines/tool_calls.py``.
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
from typing import Any, AsyncIterator, Callable, Protocol

from cluster.capabilities import engine_params, refuse_unsupported
from cluster.config import VLLMEngineConfig
from cluster.errors import EngineError, EngineUnavailableError, SLMError
from cluster.types import EngineCapabilities, GenerationChunk, GenerationRequest
from deployments.engines.gpu_common import (
    ChatTokenizer,
    TokenizerThread,
    drive_stream,
    prompt_param,
    request_prompt_ids,
)

# The pure mapping lives in vllm_mapping; its public names are re-exported here, where
# callers and tests have always found them.
from deployments.engines.vllm_mapping import (
    ToolParserFactory,
    _OutputMapper,
    engine_args_kwargs,
    finish_reason,
    is_final,
    sampling_kwargs,
    structured_outputs,
    token_logprobs,
    tool_streams,
    translate_error,
)

__all__ = [
    "VLLMBackend",
    "VLLMEngine",
    "engine_args_kwargs",
    "finish_reason",
    "is_final",
    "load_vllm_backend",
    "sampling_kwargs",
    "structured_outputs",
    "token_logprobs",
    "translate_error",
]

_INSTALL_HINT = "pip install 'slm-cluster[vllm]'"


class AsyncLLMLike(Protocol):
    """The part of ``vllm.v1.engine.async_llm.AsyncLLM`` this adapter uses."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[Any]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...

    def get_tokenizer(self) -> Any: ...


@dataclass
class VLLMBackend:
    """A started engine plus the way to build its ``SamplingParams`` from our kwargs, and,
    when the version names a ``tool_parser``, the way to make one parser per choice."""

    llm: AsyncLLMLike
    make_sampling_params: Callable[[dict[str, Any]], Any]
    make_tool_parser: ToolParserFactory | None = None


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
    parsers = load_tool_parser_factory(config.tool_parser) if config.tool_parser else None  # a bad name fails before the model loads
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args_kwargs(config)))

    def make(kw: dict[str, Any]) -> Any:
        if "structured_outputs" in kw:
            from vllm.sampling_params import StructuredOutputsParams

            kw = {**kw, "structured_outputs": StructuredOutputsParams(**kw["structured_outputs"])}
        return VLLMSamplingParams(**kw, output_kind=RequestOutputKind.DELTA)

    return VLLMBackend(llm=llm, make_sampling_params=make, make_tool_parser=parsers)


def load_tool_parser_factory(name: str) -> ToolParserFactory:
    """vLLM's registered tool parser ``name`` (``ToolParserManager.get_tool_parser``; in
    ``vllm.tool_parsers`` on current main, ``vllm.entrypoints.openai.tool_parsers`` up to 0.11),
    as a factory of one parser per choice with the ``ChatCompletionRequest`` it reads. The
    parser's ``adjust_request`` may ask for special tokens in the text (its call markers):
    that comes back as a ``skip_special_tokens`` override of the sampling options."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest
    try:
        parser_cls = ToolParserManager.get_tool_parser(name)
    except KeyError as exc:
        raise EngineError(f"vLLM has no tool parser named {name!r}: {exc}") from exc

    def make(tokenizer: Any, tools: tuple[dict[str, Any], ...], tool_choice: Any) -> tuple[Any, Any, dict[str, Any]]:
        request = ChatCompletionRequest(model="slm-cluster", messages=[{"role": "user", "content": ""}],
                                        tools=list(tools), tool_choice=tool_choice or "auto")
        parser = parser_cls(tokenizer)
        request = parser.adjust_request(request)
        overrides = {} if getattr(request, "skip_special_tokens", True) else {"skip_special_tokens": False}
        return parser, request, overrides

    return make


def version_capabilities(config: VLLMEngineConfig) -> EngineCapabilities:
    """What this version honours: the ``vllm`` row, less tools without a ``tool_parser``."""
    params = engine_params("vllm")
    if getattr(config, "tool_parser", None) is None:
        params = params - {"tools", "tool_choice"}
    return EngineCapabilities(streaming=True, logprobs=True, raw_prompt=True, params=params)


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
        # tools need a parser of the model's call format: without one, tools and tool_choice
        # are refused (400) like any parameter the engine cannot honour
        self.capabilities = version_capabilities(config)
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
        sampling = request.sampling
        tools, overrides = tool_streams(backend.make_tool_parser, tokenizer, sampling)
        try:  # vLLM validates sampling options when the object is built
            params = backend.make_sampling_params({**sampling_kwargs(sampling), **overrides})
        except Exception as exc:
            raise translate(exc) from exc
        assert self._tokenizer_thread is not None
        # A raw prompt (/v1/completions) is the client's text as is: no template, no system prompt.
        prompt_ids = await self._tokenizer_thread.run(request_prompt_ids, tokenizer, request, self.system_prompt)
        engine_id = uuid.uuid4().hex  # ours and unique per attempt, never the client's id
        mapper = _OutputMapper(want_logprobs=sampling.logprobs, prompt_tokens=len(prompt_ids), top_logprobs=sampling.top_logprobs,
                               n=sampling.n, tools=tools)

        async def open_stream() -> AsyncIterator[Any]:
            return backend.llm.generate({"prompt_token_ids": prompt_ids}, params, engine_id)

        async def abort() -> None:
            await backend.llm.abort(engine_id)

        outputs = drive_stream(open_stream, is_final=mapper.is_final, abort=abort, translate=translate)
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
