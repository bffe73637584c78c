"""SGLang adapter: SGLang's in-process ``Engine`` (``sglang.Engine``) behind the ``Engine`` seam.

SGLang is imported only in ``load_sglang_engine`` (called by ``start()``), so this module imports
on machines without SGLang or a GPU. The mapping is pure functions over SGLang's plain-dict
outputs (``deployments/engines/sglang_mapping.py``), and the engine object is injectable
(``engine_factory=``, called with the ``ServerArgs`` keyword arguments as ``sglang.Engine``
is), so the tests run on ``tests/fakes/sglang_engine.py``. Importing SGLang's engine module
sets uvloop as the process's event loop policy (its own side effect, at ``start()`` time).

API facts relied on (SGLang >= 0.5, checked against current main):
- ``sglang.Engine(**ServerArgs fields)`` (``model_path``, ``tp_size``, ``mem_fraction_static``,
  ``context_length``, ``max_running_requests``, ``dtype``, ``quantization``,
  ``disable_cuda_graph``, ``incremental_streaming_output``, ...) launches the scheduler and
  detokenizer subprocesses and blocks until the model is loaded: ``start()`` runs it in a
  worker thread. While it starts it installs a SIGQUIT handler; current SGLang skips that off
  the main thread, older releases raise, so the constructor runs under
  ``signal_handlers_guarded`` (as Ray Serve LLM's SGLang engine does).
- ``await engine.async_generate(input_ids=..., sampling_params={...}, return_logprob=...,
  stream=True, rid=...)`` returns an async generator of dicts ``{"text", "output_ids",
  "meta_info"}``. With ``incremental_streaming_output=True`` (set here unless
  ``extra_engine_args`` says otherwise) each ``text`` and ``output_token_logprobs`` holds only
  what is new; SGLang's own default is CUMULATIVE (the whole answer so far, copied at every
  step), which is still handled. ``meta_info`` has ``prompt_tokens``, ``completion_tokens``,
  ``finish_reason`` (``None`` until the end, then ``{"type": "stop", "matched": ...}``,
  ``{"type": "length", ...}`` or ``{"type": "abort", "message", "status_code"}``) and, with
  ``return_logprob``, ``output_token_logprobs``: ``(logprob, token_id, token_text_or_None)``,
  and with ``top_logprobs_num=k`` also ``output_top_logprobs``: per position, a list of k such
  triples, most likely first (incremental like the text under ``incremental_streaming_output``);
  ``async_generate`` has no ``return_text_in_logprobs``, so token texts are decoded here.
  ``stream=False`` returns the final dict instead.
- Sampling keys: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``sampling_seed``,
  ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (``{"token id": bias}``),
  ``json_schema`` (a JSON string).
- Raw prompts (/v1/completions): ``async_generate`` takes ``prompt=`` text and encodes it
  with ``tokenizer.encode(text)`` (special tokens included) in the tokenizer manager, on the
  replica's event loop; we encode it the same way on our tokenizer thread and pass
  ``input_ids``, so chat and raw prompts take one path.
- Abort: ``engine.tokenizer_manager.abort_request(rid=...)`` (synchronous). The scheduler aborts
  every request whose rid STARTS WITH the given rid, so our rids are fixed-length uuids that
  cannot prefix one another. It is a no-op once the request's state is gone, and closing
  SGLang's stream discards that state without aborting the scheduler's work, so we abort
  BEFORE closing the stream.
- Validation failures raise ``ValueError`` ("The input (N tokens) is longer than the model's
  context length (M tokens)."); scheduler-side rejections arrive as an abort finish reason with
  an HTTP ``status_code``; an abort without one (the engine dropped the request) is raised as
  a retryable 503, never sent as a cut answer. ``engine.shutdown()`` is synchronous and kills
  the subprocess tree (run in a worker thread here).
- Health: the in-process ``Engine`` has no health call (the HTTP server's ``/health_generate``
  sends a one-token request), and the tokenizer-manager flags older adapters read are gone.
  ``check_health`` therefore generates one token with a timeout, as ``/health_generate`` does.
- SGLang trims a matched stop string from its output but may already have streamed its first
  characters; stop strings are therefore enforced here as well (``ChunkAssembler``).
- ``n`` > 1: SGLang's own ``sampling_params["n"]`` turns the request into a batch whose
  children get fresh uuid rids (``regenerate_rid`` in ``_handle_batch_request``) and stream
  interleaved dicts tagged ``"index"``; the rid we pass is never live, so
  ``abort_request(rid=ours)`` is a no-op and a child's rid is known only once it has sent an
  output: a client that leaves early would leave children generating. The adapter therefore
  fans out itself, as SGLang does internally: one ``async_generate`` per choice with its own
  rid (choice i seeded with seed + i, SGLang's and vLLM's rule), merged as they stream, each
  aborted on close. SGLang's prefix-caching warm-up request for ``n`` is not replicated (the
  radix cache shares the prompt between the choices once the first one has prefilled it).
- Tool calling (``tool_parser`` in the config): the in-process ``Engine`` does not parse calls
  (its HTTP server does, in ``serving_chat``); the adapter does what that server does, with
  ``sglang.srt.function_call.function_call_parser.FunctionCallParser(tools, name)`` per
  choice (``parse_stream_chunk``, ``parse_stream_end`` on newer releases) and the detector's
  ``prev_tool_call_arr``/``streamed_args_for_tool`` for arguments it parsed but did not
  stream; a forced ``tool_choice`` becomes a ``json_schema`` (``deployments/engines/tool_calls.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from cluster.capabilities import engine_params, refuse_unsupported
from cluster.config import SGLangEngineConfig
from cluster.errors import EngineError, EngineUnavailableError, SLMError
from cluster.types import EngineCapabilities, GenerationChunk, GenerationRequest
from deployments.engines.gpu_common import (
    ChatTokenizer,
    TokenizerThread,
    drive_stream,
    merge_streams,
    prompt_param,
    request_prompt_ids,
    signal_handlers_guarded,
)

# The pure mapping lives in sglang_mapping; its public names are re-exported here, where
# callers and tests have always found them.
from deployments.engines.sglang_mapping import (
    OutputMapper,
    choice_params,
    engine_kwargs,
    finish_reason,
    is_final,
    sampling_params,
    streams_cumulative_text,
    tool_streams,
    translate_error,
)

__all__ = [
    "SGLangEngine",
    "engine_kwargs",
    "finish_reason",
    "is_final",
    "load_sglang_engine",
    "sampling_params",
    "streams_cumulative_text",
    "translate_error",
]

_INSTALL_HINT = "pip install 'slm-cluster[sglang]'"
log = logging.getLogger("ray.serve")


class TokenizerManagerLike(Protocol):
    tokenizer: Any  # a Hugging Face tokenizer

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None: ...


class SGLangEngineLike(Protocol):
    """The part of ``sglang.Engine`` this adapter uses."""

    tokenizer_manager: TokenizerManagerLike

    def async_generate(self, **kwargs: Any) -> Awaitable[Any]: ...

    def shutdown(self) -> None: ...


# --- the adapter -----------------------------------------------------------------------


def load_sglang_engine(**kwargs: Any) -> SGLangEngineLike:
    """Start a real ``sglang.Engine`` (launches subprocesses, loads the model; slow, blocking)."""
    try:
        import sglang
    except ImportError as exc:
        raise EngineUnavailableError(f"SGLang is not installed ({exc}); {_INSTALL_HINT}") from exc
    return sglang.Engine(**kwargs)


def _probe_ids(tokenizer: ChatTokenizer) -> list[int]:
    """A one-token-or-so prompt for the health probe (token 0, as SGLang's own probe, when
    the tokenizer cannot encode)."""
    try:
        return list(tokenizer.encode("Hi", add_special_tokens=False))[:4] or [0]
    except Exception:
        return [0]


def load_function_call_parser(name: str, tools: tuple[dict[str, Any], ...]) -> Any:
    """SGLang's ``FunctionCallParser(tools, tool_call_parser)`` (``sglang.srt.function_call.
    function_call_parser``, its tools as ``sglang.srt.entrypoints.openai.protocol.Tool``), one per
    choice: it keeps per-answer state. An unknown name is a ``ValueError`` from SGLang."""
    from sglang.srt.entrypoints.openai.protocol import Tool
    from sglang.srt.function_call.function_call_parser import FunctionCallParser

    return FunctionCallParser([Tool.model_validate(t) for t in tools], name)


def version_capabilities(config: SGLangEngineConfig) -> EngineCapabilities:
    """What this version honours: the ``sglang`` row, less tools without a ``tool_parser``."""
    params = engine_params("sglang")
    if getattr(config, "tool_parser", None) is None:
        params = params - {"tools", "tool_choice"}
    return EngineCapabilities(streaming=True, logprobs=True, raw_prompt=True, params=params)


class SGLangEngine:
    """One model version on SGLang's in-process ``Engine``. See the module docstring.

    ``engine_factory`` is called with ``engine_kwargs(config)`` in a worker thread by
    ``start()``; the default starts real SGLang, tests pass ``tests/fakes/sglang_engine.py``.
    """

    capabilities = EngineCapabilities(streaming=True, logprobs=True, raw_prompt=True, params=engine_params("sglang"))

    def __init__(
        self,
        config: SGLangEngineConfig,
        *,
        system_prompt: str | None = None,
        engine_factory: Callable[..., SGLangEngineLike] = load_sglang_engine,
        tool_parser_factory: Callable[[str, tuple[dict[str, Any], ...]], Any] = load_function_call_parser,
    ) -> None:
        self.config = config
        self.system_prompt = system_prompt
        # tools need a parser of the model's call format: without one, tools and tool_choice
        # are refused (400) like any parameter the engine cannot honour
        self.capabilities = version_capabilities(config)
        self._factory = engine_factory
        self._tool_parser_factory = tool_parser_factory
        self._engine: SGLangEngineLike | None = None
        self._cumulative = streams_cumulative_text(config)
        self._tokenizer_thread: TokenizerThread | None = None
        self._probe: list[int] = [0]

    async def start(self) -> None:
        """Load the model (in a worker thread: the constructor blocks for minutes). Raises
        ``EngineUnavailableError`` when SGLang is missing and ``EngineError`` when it fails."""
        if self._engine is not None:
            return
        kwargs = engine_kwargs(self.config)

        def construct() -> SGLangEngineLike:
            with signal_handlers_guarded():
                return self._factory(**kwargs)

        try:
            engine = await asyncio.to_thread(construct)
        except SLMError:
            raise
        except Exception as exc:
            raise EngineError(f"SGLang failed to start {self.config.model_path!r}: {exc}") from exc
        if self.config.tool_parser is not None:
            try:  # a parser name SGLang does not know fails here, not on the first request
                self._make_tool_parser(())
            except Exception:
                await asyncio.to_thread(engine.shutdown)
                raise
        self._tokenizer_thread = TokenizerThread("sglang-tokenizer")
        self._probe = await self._tokenizer_thread.run(_probe_ids, engine.tokenizer_manager.tokenizer)
        self._engine = engine

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Text chunks in order, then one final chunk with finish reason and usage. A raw
        prompt (``request.prompt``) is sent as is, without the chat template or the system
        prompt. Closing or cancelling the iterator aborts the request in SGLang."""
        engine = self._require_started()
        refuse_unsupported(self.capabilities, request, "sglang")
        sampling = request.sampling
        params = sampling_params(sampling)  # a bad seed is a 400 before any work
        top = sampling.top_logprobs if sampling.logprobs else 0
        tokenizer: ChatTokenizer = engine.tokenizer_manager.tokenizer
        assert self._tokenizer_thread is not None
        # A raw prompt (/v1/completions) is the client's text as is: no template, no system prompt.
        prompt_ids = await self._tokenizer_thread.run(request_prompt_ids, tokenizer, request, self.system_prompt)
        # ours, fixed length: SGLang aborts by prefix, so no id may prefix another. One SGLang
        # request per choice (see "n" in the module docstring), each with its own rid.
        rids = [uuid.uuid4().hex for _ in range(sampling.n)]
        mapper = OutputMapper(
            want_logprobs=sampling.logprobs,
            cumulative=self._cumulative,
            stops=sampling.stop,
            decode=lambda token_id: tokenizer.decode([token_id]),
            prompt_tokens=len(prompt_ids),
            prompt_param=prompt_param(request),
            top_logprobs=top,
            n=sampling.n,
            tools=tool_streams(self._make_tool_parser, sampling),
        )
        extra = {"top_logprobs_num": top} if top else {}  # only when asked: the call is unchanged otherwise
        translate = functools.partial(translate_error, prompt_param=prompt_param(request))

        def choice_stream(index: int) -> AsyncIterator[dict[str, Any]]:
            rid = rids[index]

            def open_stream() -> Awaitable[AsyncIterator[dict[str, Any]]]:
                return engine.async_generate(
                    input_ids=prompt_ids,
                    sampling_params=choice_params(params, index),
                    return_logprob=sampling.logprobs,
                    stream=True,
                    rid=rid,
                    **extra,
                )

            async def abort() -> None:
                engine.tokenizer_manager.abort_request(rid=rid)

            return drive_stream(open_stream, is_final=is_final, abort=abort, translate=translate)

        async def abort_all() -> None:
            for rid in rids:  # a no-op for a choice that already finished (its rid is no longer live)
                engine.tokenizer_manager.abort_request(rid=rid)

        outputs = merge_streams([choice_stream(i) for i in range(sampling.n)], abort_all=abort_all)
        try:
            async for index, output in outputs:
                for chunk in mapper.feed(output, index):
                    yield chunk
        finally:
            await outputs.aclose()  # closes every choice's stream: drive_stream aborts the unfinished ones

    async def check_health(self) -> None:
        """Generates one token, as SGLang's ``/health_generate`` does. Raises
        ``EngineUnavailableError`` when not started, when the engine is gone, when the probe
        fails or when it takes longer than ``health_check_timeout_s`` (then it is aborted).
        A scheduler that answers the probe with a rejection (overloaded) is alive: healthy."""
        engine = self._require_started()
        if engine.tokenizer_manager is None:
            raise EngineUnavailableError("SGLang engine has no tokenizer manager (it is shutting down)")
        rid = "health-" + uuid.uuid4().hex  # cannot prefix, or be prefixed by, a request's rid
        probe = engine.async_generate(
            input_ids=list(self._probe), sampling_params={"max_new_tokens": 1, "temperature": 0.0}, stream=False, rid=rid
        )
        try:
            await asyncio.wait_for(probe, timeout=self.config.health_check_timeout_s)
        except asyncio.TimeoutError as exc:
            with_abort_logged(engine, rid)
            raise EngineUnavailableError(f"SGLang did not generate one token within {self.config.health_check_timeout_s:g} s") from exc
        except Exception as exc:
            raise EngineUnavailableError(f"SGLang health probe failed: {type(exc).__name__}: {exc}") from exc

    async def shutdown(self) -> None:
        """Stop the engine's subprocesses and free the GPU (in a worker thread: SGLang waits
        for its children). Idempotent; safe before ``start()``. A failure to stop is raised
        once as ``EngineError``; the engine counts as stopped."""
        engine, self._engine = self._engine, None
        thread, self._tokenizer_thread = self._tokenizer_thread, None
        if thread is not None:
            thread.close()
        if engine is None:
            return
        try:
            await asyncio.to_thread(engine.shutdown)
        except Exception as exc:
            raise EngineError(f"SGLang shutdown failed: {exc}") from exc

    def _make_tool_parser(self, tools: tuple[dict[str, Any], ...]) -> Any:
        assert self.config.tool_parser is not None
        try:
            return self._tool_parser_factory(self.config.tool_parser, tools)
        except (ImportError, ValueError) as exc:  # SGLang: "Unsupported tool_call_parser"
            raise EngineError(f"SGLang tool parser {self.config.tool_parser!r}: {exc}") from exc

    def _require_started(self) -> SGLangEngineLike:
        if self._engine is None:
            raise EngineUnavailableError("SGLang engine is not started")
        return self._engine


def with_abort_logged(engine: SGLangEngineLike, rid: str) -> None:
    """Abort ``rid``; a failure is logged, never raised over the error being reported."""
    try:
        engine.tokenizer_manager.abort_request(rid=rid)
    except Exception:
        log.warning("SGLang abort of %s failed", rid, exc_info=True)
