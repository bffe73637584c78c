"""The SGLang adapter's pure mapping: our config and sampling options to SGLang's keyword
arguments, and SGLang's output dicts (``{"text", "output_ids", "meta_info"}``) and failures to
our chunks and typed errors. No SGLang import; the shapes relied on are listed in
``deployments/engines/sglang.py``'s module docstring."""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from cluster.config import SGLangEngineConfig
from cluster.errors import EngineError, EngineUnavailableError, RateLimitedError, SLMError
from cluster.types import FinishReason, GenerationChunk, SamplingParams, TokenLogprob, Usage
from deployments.engines.common import penalty_kwargs
from deployments.engines.gpu_common import SEED_MAX, Choices, check_seed, invalid_request
from deployments.engines.tool_calls import (
    DetectorToolStream,
    NamedCallStream,
    RequiredCallsStream,
    ToolChoices,
    ToolStream,
    forced_schema,
    named_function,
    tool_mode,
)


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
    params.update(penalty_kwargs(sampling, bias_keys_as_str=True))  # SGLang's logit_bias: {"token id": bias}
    fmt = sampling.response_format
    if fmt is not None and fmt["type"] != "text":
        # SGLang constrains decoding to a JSON schema given as a string; json_object is any object
        schema = fmt["json_schema"].get("schema") if fmt["type"] == "json_schema" else None
        params["json_schema"] = json.dumps(schema or {"type": "object"})
    forced = forced_schema(sampling)
    if forced is not None:  # a forced tool call wins over response_format (deployments/engines/tool_calls.py)
        params["json_schema"] = json.dumps(forced)
    return params


def tool_streams(make_parser: Callable[[tuple[dict[str, Any], ...]], Any] | None, sampling: SamplingParams) -> list[ToolStream]:
    """One ``ToolStream`` per choice for the request's ``tool_choice`` (none without tools or
    with ``"none"``); ``make_parser(tools)``: a fresh SGLang ``FunctionCallParser``."""
    mode = tool_mode(sampling)
    if mode is None:
        return []
    if mode == "named":
        return [NamedCallStream(named_function(sampling)["name"]) for _ in range(sampling.n)]
    if mode == "required":
        return [RequiredCallsStream() for _ in range(sampling.n)]
    assert make_parser is not None  # the capabilities refused tools otherwise
    return [DetectorToolStream(make_parser(sampling.tools)) for _ in range(sampling.n)]


def _error_for_status(status: int, message: str, prompt_param: str = "messages") -> SLMError:
    if status == 429:
        return RateLimitedError(message)
    if 400 <= status < 500:
        return invalid_request(message, prompt_param=prompt_param)
    return EngineUnavailableError(message) if status == 503 else EngineError(message)


def finish_reason(reason: Any, *, prompt_param: str = "messages") -> FinishReason:
    """Our finish reason for SGLang's ``meta_info["finish_reason"]``.

    An abort with an HTTP ``status_code`` is the scheduler rejecting or failing the request
    and is raised as the matching typed error; a bare abort (the engine dropped the request:
    another client's prefix abort, a pause, a shutdown) is raised as ``EngineUnavailableError``
    (503, retryable), never reported as a finished answer. ``prompt_param``: the field a
    context-length 400 names (``prompt`` for a raw prompt).
    """
    kind = reason.get("type") if isinstance(reason, Mapping) else reason
    if kind in ("stop", "length"):
        return kind  # type: ignore[return-value]
    if kind == "abort":
        status = reason.get("status_code") if isinstance(reason, Mapping) else None
        message = str((reason.get("message") if isinstance(reason, Mapping) else None) or "SGLang aborted the request")
        if status is None:
            raise EngineUnavailableError(f"SGLang aborted the request: {message}")
        raise _error_for_status(int(status), message, prompt_param)
    raise EngineError(f"SGLang ended the request with finish_reason={reason!r}")


def translate_error(exc: Exception, *, prompt_param: str = "messages") -> SLMError:
    """The typed error for an exception raised by ``async_generate`` or its stream
    (``prompt_param`` as for ``finish_reason``)."""
    if isinstance(exc, SLMError):
        return exc
    status = getattr(exc, "status_code", None)  # fastapi.HTTPException from the tokenizer manager
    if isinstance(status, int):
        return _error_for_status(status, str(getattr(exc, "detail", exc)), prompt_param)
    # SGLang's convention (its HTTP server answers these with 400): request validation
    # failures are ValueErrors raised before the request reaches the scheduler.
    if type(exc) is ValueError:
        return invalid_request(str(exc), prompt_param=prompt_param)
    return EngineError(f"SGLang generation failed: {type(exc).__name__}: {exc}")


def is_final(output: Mapping[str, Any]) -> bool:
    return (output.get("meta_info") or {}).get("finish_reason") is not None


def choice_params(params: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Choice ``index``'s sampling params when the adapter fans ``n`` out itself: a seeded
    request seeds choice i with seed + i (vLLM's and current SGLang's own rule for ``n``),
    seed - i where that would leave int64."""
    out = dict(params)
    seed = out.get("sampling_seed")
    if seed is not None and index:
        out["sampling_seed"] = seed + index if seed + index <= SEED_MAX else seed - index
    return out


class OutputMapper:
    """Maps one request's output dicts to chunks, turning cumulative text into deltas.

    ``n`` choices: ``feed(output, index)`` takes choice ``index``'s outputs (the adapter runs
    one SGLang request per choice); one final chunk once every choice finished, with usage
    counting the prompt once and every choice's completion tokens.

    ``top_logprobs``: how many alternatives each ``TokenLogprob`` carries, from
    ``meta_info["output_top_logprobs"]`` (per position, ``(logprob, token_id, text_or_None)``
    for the k most likely tokens; asked for with ``top_logprobs_num=k``). Token texts SGLang
    leaves out are decoded here, once per token id per request."""

    def __init__(
        self,
        *,
        want_logprobs: bool,
        cumulative: bool,
        stops: Sequence[str],
        decode: Callable[[int], str],
        prompt_tokens: int,
        prompt_param: str = "messages",
        top_logprobs: int = 0,
        n: int = 1,
        tools: Sequence[ToolStream] = (),
    ) -> None:
        self._want_logprobs = want_logprobs
        self._top = top_logprobs
        self._decoded: dict[int, str] = {}
        self._cumulative = cumulative
        self._decode = decode
        self._prompt_tokens = prompt_tokens
        self._prompt_param = prompt_param
        self._text_seen = [0] * n
        self._logprobs_seen = [0] * n
        self._completion_tokens = [0] * n
        self._choices = Choices(n, stops)
        self._tools = ToolChoices(tools)

    def feed(self, output: Mapping[str, Any], index: int = 0) -> list[GenerationChunk]:
        meta = output.get("meta_info") or {}
        text, logprobs, calls = self._new_text(index, output.get("text") or ""), self._new_logprobs(index, meta), []
        if self._tools:
            text, logprobs, calls = self._tools.split(index, text, (), logprobs)
        chunks = self._choices.delta(index, text, logprobs) + calls
        reason = meta.get("finish_reason")
        if reason is not None:
            self._prompt_tokens = int(meta.get("prompt_tokens", self._prompt_tokens))
            self._completion_tokens[index] = int(meta.get("completion_tokens", 0))
            matched = reason.get("matched") if isinstance(reason, Mapping) else None
            ours = finish_reason(reason, prompt_param=self._prompt_param)
            called = False
            if self._tools:
                held, owed, called = self._tools.close(index)
                chunks += self._choices.delta(index, held) + owed
            chunks += self._choices.finish(index, ours, matched_stop=matched if isinstance(matched, str) else None)
            if called:
                self._choices.set_reason(index, "tool_calls")
            if self._choices.done:
                chunks.append(self._choices.final(Usage(prompt_tokens=self._prompt_tokens, completion_tokens=sum(self._completion_tokens))))
        return chunks

    def _new_text(self, index: int, text: str) -> str:
        if not self._cumulative:
            return text
        delta = text[self._text_seen[index] :]
        self._text_seen[index] = max(self._text_seen[index], len(text))
        return delta

    def _new_logprobs(self, index: int, meta: Mapping[str, Any]) -> tuple[TokenLogprob, ...]:
        if not self._want_logprobs:
            return ()
        entries = list(meta.get("output_token_logprobs") or ())
        tops = list(meta.get("output_top_logprobs") or ()) if self._top else []
        seen = self._logprobs_seen[index] if self._cumulative else 0
        self._logprobs_seen[index] = max(seen, len(entries))
        entries, tops = entries[seen:], tops[seen:]
        return tuple(
            TokenLogprob(token=self._text(token_id, text), logprob=float(logprob),
                         top=self._alternatives(tops[i]) if i < len(tops) else ())
            for i, (logprob, token_id, text) in enumerate(entries)
        )

    def _alternatives(self, position: Sequence[Any] | None) -> tuple[tuple[str, float], ...]:
        best = sorted(position or (), key=lambda e: float(e[0]), reverse=True)[: self._top]
        return tuple((self._text(token_id, text), float(logprob)) for logprob, token_id, text in best)

    def _text(self, token_id: Any, text: str | None) -> str:
        if text is not None:
            return text
        if token_id not in self._decoded:
            self._decoded[token_id] = self._decode(int(token_id))
        return self._decoded[token_id]
