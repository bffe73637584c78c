"""SGLang adapter: SGLang's in-process ``Engine`` (``sglang.Engine``) behind the ``Engine`` seam.

SGLang is imported only in ``load_sglang_engine`` (called by ``start()``), so this module imports
on machines without SGLang or a GPU. The mapping is pure functions over SGLang's plain-dict
outputs, and the engine object is injectable (``loader=``), so the unit tests run on fakes.
Importing SGLang's engine module sets uvloop as the process's event loop policy (its own side
effect, at ``start()`` time).

API facts relied on (SGLang >= 0.5, checked against current main):
- ``sglang.Engine(**ServerArgs fields)`` (``model_path``, ``tp_size``, ``mem_fraction_static``,
  ``context_length``, ``dtype``, ...) launches the scheduler and detokenizer subprocesses.
- ``await engine.async_generate(input_ids=..., sampling_params={...}, return_logprob=...,
  stream=True, rid=...)`` returns an async generator of dicts ``{"text", "output_ids",
  "meta_info"}``. ``text`` is CUMULATIVE (the whole answer so far) unless the engine runs with
  ``incremental_streaming_output=True``; ``meta_info`` has ``prompt_tokens``,
  ``completion_tokens``, ``finish_reason`` (``None`` until the end, then
  ``{"type": "stop", "matched": ...}``, ``{"type": "length", ...}`` or ``{"type": "abort",
  "message", "status_code"}``) and, with ``return_logprob``, ``output_token_logprobs`` (cumulative
  like ``text``): ``(logprob, token_id, token_text_or_None)``; ``async_generate`` has no
  ``return_text_in_logprobs``, so token texts are decoded here.
- Sampling keys: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``sampling_seed``.
- Abort: ``engine.tokenizer_manager.abort_request(rid=...)`` (synchronous). It is a no-op once
  the request's state is gone, and closing SGLang's stream discards that state without aborting
  the scheduler's work, so we abort BEFORE closing the stream.
- Validation failures raise ``ValueError`` ("The input (N tokens) is longer than the model's
  context length (M tokens)."); scheduler-side rejections arrive as an abort finish reason with
  an HTTP ``status_code``. ``engine.shutdown()`` is synchronous. There is no in-process health
  call: ``tokenizer_manager.gracefully_exit`` / ``health_check_failed`` are the signals, and a
  dead subprocess makes SGLang's watchdog kill the whole process.
- SGLang trims a matched stop string from its output but may already have streamed its first
  characters; stop strings are therefore enforced here as well (``ChunkAssembler``).
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence

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
from deployments.engines.gpu_common import ChatTokenizer, ChunkAssembler, drive_stream, invalid_request, render_prompt_ids

_INSTALL_HINT = "pip install 'slm-cluster[sglang]'"


class TokenizerManagerLike(Protocol):
    tokenizer: Any

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None: ...


class SGLangEngineLike(Protocol):
    """The part of ``sglang.Engine`` this adapter uses."""

    tokenizer_manager: TokenizerManagerLike

    def async_generate(self, **kwargs: Any) -> Awaitable[Any]: ...

    def shutdown(self) -> None: ...


# --- pure mapping ----------------------------------------------------------------------


def engine_kwargs(config: SGLangEngineConfig) -> dict[str, Any]:
    """``sglang.Engine`` keyword arguments (``ServerArgs`` fields); ``extra_engine_args`` win."""
    kwargs: dict[str, Any] = {
        "model_path": config.model_path,
        "tp_size": config.tp_size,
        "mem_fraction_static": config.mem_fraction_static,
        "dtype": config.dtype,
    }
    if config.context_length is not None:
        kwargs["context_length"] = config.context_length
    if config.max_running_requests is not None:
        kwargs["max_running_requests"] = config.max_running_requests
    return {**kwargs, **config.extra_engine_args}


def streams_cumulative_text(config: SGLangEngineConfig) -> bool:
    """Whether the engine's stream repeats the whole answer in each output (SGLang's default)."""
    return not bool(config.extra_engine_args.get("incremental_streaming_output", False))


def sampling_params(sampling: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params`` dict. Unset options are left out (older SGLang rejects
    keys it does not know, ``sampling_seed`` among them)."""
    params: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
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
    and is raised as the matching typed error; a bare abort (the engine dropped the request)
    is reported as ``"abort"``.
    """
    kind = reason.get("type") if isinstance(reason, Mapping) else reason
    if kind in ("stop", "length"):
        return kind  # type: ignore[return-value]
    if kind == "abort":
        status = reason.get("status_code") if isinstance(reason, Mapping) else None
        if status is None:
            return "abort"
        message = str(reason.get("message") or "SGLang aborted the request")
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


def load_sglang_engine(config: SGLangEngineConfig) -> SGLangEngineLike:
    """Start a real ``sglang.Engine`` (launches subprocesses, loads the model; slow, blocking)."""
    try:
        import sglang
    except ImportError as exc:
        raise EngineUnavailableError(f"SGLang is not installed ({exc}); {_INSTALL_HINT}") from exc
    return sglang.Engine(**engine_kwargs(config))


class SGLangEngine:
    """One model version on SGLang's in-process ``Engine``. See the module docstring.

    ``loader`` builds the engine in ``start()``; the default starts real SGLang, tests pass fakes.
    """

    capabilities = EngineCapabilities(streaming=True, logprobs=True)

    def __init__(
        self,
        config: SGLangEngineConfig,
        *,
        system_prompt: str | None = None,
        loader: Callable[[SGLangEngineConfig], SGLangEngineLike] = load_sglang_engine,
    ) -> None:
        self.config = config
        self.system_prompt = system_prompt
        self._loader = loader
        self._engine: SGLangEngineLike | None = None
        self._cumulative = streams_cumulative_text(config)
        # The rid given to SGLang is the request id plus a per-engine sequence number, so a
        # retry reusing a request id cannot collide with an attempt still running here.

    async def start(self) -> None:
        """Load the model. Raises ``EngineUnavailableError`` when SGLang is missing and
        ``EngineError`` when it fails to start."""
        if self._engine is not None:
            return
        try:
            self._engine = self._loader(self.config)
        except SLMError:
            raise
        except Exception as exc:
            raise EngineError(f"SGLang failed to start {self.config.model_path!r}: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Text chunks in order, then one final chunk with finish reason and usage. Closing
        or cancelling the iterator aborts the request in SGLang."""
        engine = self._require_started()
        tokenizer: ChatTokenizer = engine.tokenizer_manager.tokenizer
        prompt_ids = render_prompt_ids(tokenizer, with_system_prompt(request, self.system_prompt))
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
                sampling_params=sampling_params(request.sampling),
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
        """Raises ``EngineUnavailableError`` when not started or when SGLang's tokenizer
        manager reports that it is exiting or failed its health check."""
        engine = self._require_started()
        manager = engine.tokenizer_manager
        if manager is None or getattr(manager, "gracefully_exit", False) or getattr(manager, "health_check_failed", False):
            raise EngineUnavailableError("SGLang engine is exiting or failed its health check")

    async def shutdown(self) -> None:
        """Stop the engine's subprocesses and free the GPU. Idempotent; safe before ``start()``.
        A failure to stop is raised once as ``EngineError``; the engine counts as stopped."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            engine.shutdown()
        except Exception as exc:
            raise EngineError(f"SGLang shutdown failed: {exc}") from exc

    def _require_started(self) -> SGLangEngineLike:
        if self._engine is None:
            raise EngineUnavailableError("SGLang engine is not started")
        return self._engine
