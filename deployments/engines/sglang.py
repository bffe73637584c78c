"""SGLang adapter: SGLang's in-process ``Engine`` (``sglang.Engine``) behind the ``Engine`` seam.

SGLang is imported only in ``load_sglang_engine`` (called by ``start()``), so this module imports
on machines without SGLang or a GPU. The mapping is pure functions over SGLang's plain-dict
outputs, and the engine object is injectable (``engine_factory=``, called with the
``ServerArgs`` keyword arguments as ``sglang.Engine`` is), so the tests run on
``tests/fakes/sglang_engine.py``. Importing SGLang's engine module sets uvloop as the process's
event loop policy (its own side effect, at ``start()`` time).

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
  ``return_logprob``, ``output_token_logprobs``: ``(logprob, token_id, token_text_or_None)``;
  ``async_generate`` has no ``return_text_in_logprobs``, so token texts are decoded here.
  ``stream=False`` returns the final dict instead.
- Sampling keys: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``sampling_seed``.
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
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence

from cluster.capabilities import engine_params, refuse_unsupported
from cluster.config import SGLangEngineConfig
from cluster.errors import EngineError, EngineUnavailableError, RateLimitedError, SLMError
from cluster.types import (
    EngineCapabilities,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from deployments.engines.common import with_system_prompt
from deployments.engines.gpu_common import (
    ChatTokenizer,
    ChunkAssembler,
    TokenizerThread,
    check_seed,
    drive_stream,
    invalid_request,
    render_prompt_ids,
    signal_handlers_guarded,
)

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


# --- pure mapping ----------------------------------------------------------------------


def engine_kwargs(config: SGLangEngineConfig) -> dict[str, Any]:
    """``sglang.Engine`` keyword arguments (``ServerArgs`` fields); ``extra_engine_args`` win.

    ``incremental_streaming_output`` is on unless ``extra_engine_args`` turns it off: SGLang's
    cumulative default copies the whole answer into every streamed output."""
    kwargs: dict[str, Any] = {
        "model_path": config.model_path,
        "tp_size": config.tp_size,
        "mem_fraction_static": config.mem_fraction_static,
        "dtype": config.dtype,
        "incremental_streaming_output": True,
    }
    if config.context_length is not None:
        kwargs["context_length"] = config.context_length
    if config.max_running_requests is not None:
        kwargs["max_running_requests"] = config.max_running_requests
    if config.quantization is not None:
        kwargs["quantization"] = config.quantization
    if config.disable_cuda_graph:
        kwargs["disable_cuda_graph"] = True
    return {**kwargs, **config.extra_engine_args}


def streams_cumulative_text(config: SGLangEngineConfig) -> bool:
    """Whether the engine's stream repeats the whole answer in each output."""
    return not bool(engine_kwargs(config).get("incremental_streaming_output", False))


def sampling_params(sampling: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params`` dict. Unset options are left out (older SGLang rejects
    keys it does not know, ``sampling_seed`` among them). A seed outside int64 is a 400."""
    check_seed(sampling.seed)
    params: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    if sampling.presence_penalty:
        params["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        params["frequency_penalty"] = sampling.frequency_penalty
    if sampling.logit_bias:
        params["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    fmt = sampling.response_format
    if fmt is not None and fmt["type"] != "text":
        # SGLang constrains decoding to a JSON schema given as a string; json_object is any object
        schema = fmt["json_schema"].get("schema") if fmt["type"] == "json_schema" else None
        params["json_schema"] = json.dumps(schema or {"type": "object"})
    return params


def _error_for_status(status: int, message: str) -> SLMError:
    if status == 429:
        return RateLimitedError(message)
    if 400 <= status < 500:
        return invalid_request(message)
    return EngineUnavailableError(message) if status == 503 else EngineError(message)


def finish_reason(reason: Any) -> FinishReason:
    """Our finish reason for SGLang's ``meta_info["finish_reason"]``.

    An abort with an HTTP ``status_code`` is the scheduler rejecting or failing the request
    and is raised as the matching typed error; a bare abort (the engine dropped the request:
    another client's prefix abort, a pause, a shutdown) is raised as ``EngineUnavailableError``
    (503, retryable), never reported as a finished answer.
    """
    kind = reason.get("type") if isinstance(reason, Mapping) else reason
    if kind in ("stop", "length"):
        return kind  # type: ignore[return-value]
    if kind == "abort":
        status = reason.get("status_code") if isinstance(reason, Mapping) else None
        message = str((reason.get("message") if isinstance(reason, Mapping) else None) or "SGLang aborted the request")
        if status is None:
            raise EngineUnavailableError(f"SGLang aborted the request: {message}")
        raise _error_for_status(int(status), message)
    raise EngineError(f"SGLang ended the request with finish_reason={reason!r}")


def translate_error(exc: Exception) -> SLMError:
    """The typed error for an exception raised by ``async_generate`` or its stream."""
    if isinstance(exc, SLMError):
        return exc
    status = getattr(exc, "status_code", None)  # fastapi.HTTPException from the tokenizer manager
    if isinstance(status, int):
        return _error_for_status(status, str(getattr(exc, "detail", exc)))
    # SGLang's convention (its HTTP server answers these with 400): request validation
    # failures are ValueErrors raised before the request reaches the scheduler.
    if type(exc) is ValueError:
        return invalid_request(str(exc))
    return EngineError(f"SGLang generation failed: {type(exc).__name__}: {exc}")


def is_final(output: Mapping[str, Any]) -> bool:
    return (output.get("meta_info") or {}).get("finish_reason") is not None


class _OutputMapper:
    """Maps one request's output dicts to chunks, turning cumulative text into deltas."""

    def __init__(
        self,
        *,
        want_logprobs: bool,
        cumulative: bool,
        stops: Sequence[str],
        decode: Callable[[int], str],
        prompt_tokens: int,
    ) -> None:
        self._want_logprobs = want_logprobs
        self._cumulative = cumulative
        self._decode = decode
        self._prompt_tokens = prompt_tokens
        self._text_seen = 0
        self._logprobs_seen = 0
        self._assembler = ChunkAssembler(stops)

    def feed(self, output: Mapping[str, Any]) -> list[GenerationChunk]:
        meta = output.get("meta_info") or {}
        chunk = self._assembler.delta(self._new_text(output.get("text") or ""), self._new_logprobs(meta))
        chunks = [chunk] if chunk is not None else []
        reason = meta.get("finish_reason")
        if reason is not None:
            usage = Usage(
                prompt_tokens=int(meta.get("prompt_tokens", self._prompt_tokens)),
                completion_tokens=int(meta.get("completion_tokens", 0)),
            )
            matched = reason.get("matched") if isinstance(reason, Mapping) else None
            chunks += self._assembler.final(finish_reason(reason), usage, matched_stop=matched if isinstance(matched, str) else None)
        return chunks

    def _new_text(self, text: str) -> str:
        if not self._cumulative:
            return text
        delta = text[self._text_seen :]
        self._text_seen = max(self._text_seen, len(text))
        return delta

    def _new_logprobs(self, meta: Mapping[str, Any]) -> tuple[TokenLogprob, ...]:
        if not self._want_logprobs:
            return ()
        entries = list(meta.get("output_token_logprobs") or ())
        if self._cumulative:
            entries, self._logprobs_seen = entries[self._logprobs_seen :], max(self._logprobs_seen, len(entries))
        return tuple(
            TokenLogprob(token=text if text is not None else self._decode(int(token_id)), logprob=float(logprob))
            for logprob, token_id, text in entries
        )


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


class SGLangEngine:
    """One model version on SGLang's in-process ``Engine``. See the module docstring.

    ``engine_factory`` is called with ``engine_kwargs(config)`` in a worker thread by
    ``start()``; the default starts real SGLang, tests pass ``tests/fakes/sglang_engine.py``.
    """

    capabilities = EngineCapabilities(streaming=True, logprobs=True, params=engine_params("sglang"))

    def __init__(
        self,
        config: SGLangEngineConfig,
        *,
        system_prompt: str | None = None,
        engine_factory: Callable[..., SGLangEngineLike] = load_sglang_engine,
    ) -> None:
        self.config = config
        self.system_prompt = system_prompt
        self._factory = engine_factory
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
        self._tokenizer_thread = TokenizerThread("sglang-tokenizer")
        self._probe = await self._tokenizer_thread.run(_probe_ids, engine.tokenizer_manager.tokenizer)
        self._engine = engine

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Text chunks in order, then one final chunk with finish reason and usage. Closing
        or cancelling the iterator aborts the request in SGLang."""
        engine = self._require_started()
        refuse_unsupported(self.capabilities, request, "sglang")
        params = sampling_params(request.sampling)  # a bad seed is a 400 before any work
        tokenizer: ChatTokenizer = engine.tokenizer_manager.tokenizer
        assert self._tokenizer_thread is not None
        prompt_ids = await self._tokenizer_thread.run(render_prompt_ids, tokenizer, with_system_prompt(request, self.system_prompt))
        rid = uuid.uuid4().hex  # ours, fixed length: SGLang aborts by prefix, so no id may prefix another
        mapper = _OutputMapper(
            want_logprobs=request.sampling.logprobs,
            cumulative=self._cumulative,
            stops=request.sampling.stop,
            decode=lambda token_id: tokenizer.decode([token_id]),
            prompt_tokens=len(prompt_ids),
        )

        def open_stream() -> Awaitable[AsyncIterator[dict[str, Any]]]:
            return engine.async_generate(
                input_ids=prompt_ids,
                sampling_params=params,
                return_logprob=request.sampling.logprobs,
                stream=True,
                rid=rid,
            )

        async def abort() -> None:
            engine.tokenizer_manager.abort_request(rid=rid)

        outputs = drive_stream(open_stream, is_final=is_final, abort=abort, translate=translate_error)
        try:
            async for output in outputs:
                for chunk in mapper.feed(output):
                    yield chunk
        finally:
            await outputs.aclose()  # runs drive_stream's abort when we stop early

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
