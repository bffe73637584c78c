"""The vLLM adapter's pure mapping: our config and sampling options to vLLM's keyword
arguments, and vLLM's DELTA ``RequestOutput``s (duck-typed) and failures to our chunks and typed
errors, ``n`` choices and tool calls included. No vLLM import; the API facts relied on are
listed in ``deployments/engines/vllm.py``'s module docstring."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from cluster.config import VLLMEngineConfig
from cluster.errors import EngineError, EngineUnavailableError, SLMError
from cluster.types import FinishReason, GenerationChunk, SamplingParams, TokenLogprob, Usage
from deployments.engines.common import penalty_kwargs
from deployments.engines.gpu_common import Choices, check_seed, has_class_named, invalid_request
from deployments.engines.tool_calls import (
    NamedCallStream,
    ParsedToolStream,
    RequiredCallsStream,
    ToolChoices,
    ToolStream,
    forced_schema,
    named_function,
    tool_mode,
)

# vLLM's finish reasons -> ours. "repetition" (a repetition detector ended the answer) is a
# natural stop, not a cut. "abort" (the engine dropped the request; we never see our own
# aborts: the stream is closed by then) and "error" are raised by ``finish_reason``.
_FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}


# (tokenizer, tools, tool_choice) -> (a fresh vLLM ToolParser, the ChatCompletionRequest it
# reads, SamplingParams overrides its ``adjust_request`` asked for, e.g. skip_special_tokens)
ToolParserFactory = Callable[[Any, tuple[dict[str, Any], ...], Any], tuple[Any, Any, dict[str, Any]]]



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
    if sampling.n > 1:
        # vLLM fans out n child requests (seed + i each when seeded) and streams their
        # CompletionOutputs tagged with ``index`` (vllm/v1/engine/parallel_sampling.py)
        kwargs["n"] = sampling.n
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    if sampling.logprobs:
        # 0: the sampled token's logprob alone; k: also the k most likely tokens per position
        kwargs["logprobs"] = sampling.top_logprobs
    kwargs.update(penalty_kwargs(sampling, bias_keys_as_str=False))  # vLLM's logit_bias takes int token ids
    structured = structured_outputs(sampling.response_format)
    schema = forced_schema(sampling)
    if schema is not None:  # a forced tool call wins over response_format, as in vLLM's server
        structured = {"json": schema}
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
    """Maps one request's DELTA ``RequestOutput``s to chunks and keeps its usage.

    With ``n`` > 1 each ``RequestOutput`` holds the ``CompletionOutput``s of the choices that
    moved since the last one we read (vLLM merges queued deltas by ``index``), so a choice may
    be missing from a step, and a choice's own ``finish_reason`` arrives while others still
    run; ``finished`` is set once every choice ended. Usage counts the tokens of every choice
    and the prompt once. ``tools``: one ``ToolStream`` per choice when the request's tools
    are read from the answer."""

    def __init__(self, *, want_logprobs: bool, prompt_tokens: int, top_logprobs: int = 0, n: int = 1,
                 tools: Sequence[ToolStream] = ()) -> None:
        self._want_logprobs = want_logprobs
        self._top = top_logprobs
        self._prompt_tokens = prompt_tokens
        self._completion_tokens = 0
        self._choices = Choices(n)  # vLLM enforces stop strings itself
        self._tools = ToolChoices(tools)
        self._final_sent = False

    def is_final(self, output: Any) -> bool:
        """Whether ``output`` ends the request: ``finished``, or every choice has a reason."""
        if output.finished:
            return True
        ending = {int(getattr(c, "index", 0) or 0) for c in output.outputs if c.finish_reason is not None}
        return all(self._choices.finished(i) or i in ending for i in range(self._choices.n))

    def feed(self, output: Any) -> list[GenerationChunk]:
        if output.prompt_token_ids is not None:
            self._prompt_tokens = len(output.prompt_token_ids)
        chunks: list[GenerationChunk] = []
        for completion in output.outputs:
            chunks += self._feed_choice(completion)
        if (output.finished or self._choices.done) and not self._final_sent:
            if not self._choices.done:
                raise EngineError(f"vLLM finished the request with choices still open (n={self._choices.n})")
            self._final_sent = True
            chunks.append(self._choices.final(Usage(prompt_tokens=self._prompt_tokens, completion_tokens=self._completion_tokens)))
        return chunks

    def _feed_choice(self, completion: Any) -> list[GenerationChunk]:
        index = int(getattr(completion, "index", 0) or 0)
        token_ids = list(completion.token_ids)
        self._completion_tokens += len(token_ids)
        logprobs = token_logprobs(token_ids, completion.logprobs, self._top) if self._want_logprobs else ()
        text, calls = completion.text, []
        if self._tools:
            text, logprobs, calls = self._tools.split(index, text, token_ids, logprobs)
        chunks = self._choices.delta(index, text, logprobs) + calls
        if completion.finish_reason is not None:
            reason = finish_reason(completion.finish_reason)
            if self._tools:
                held, owed, called = self._tools.close(index)
                chunks += self._choices.delta(index, held) + owed
            chunks += self._choices.finish(index, reason)
            if self._tools and called:
                self._choices.set_reason(index, "tool_calls")
        return chunks


def is_final(output: Any) -> bool:
    """Whether a one-choice request's output ends it (``_OutputMapper.is_final`` for any n)."""
    return bool(output.finished) or output.outputs[0].finish_reason is not None


def tool_streams(make_tool_parser: ToolParserFactory | None, tokenizer: Any, sampling: SamplingParams) -> tuple[list[ToolStream], dict[str, Any]]:
    """One ``ToolStream`` per choice for the request's ``tool_choice`` (none without tools or
    with ``"none"``), and the ``SamplingParams`` overrides the parser asked for."""
    mode = tool_mode(sampling)
    if mode is None:
        return [], {}
    if mode == "named":
        name = named_function(sampling)["name"]
        return [NamedCallStream(name) for _ in range(sampling.n)], {}
    if mode == "required":
        return [RequiredCallsStream() for _ in range(sampling.n)], {}
    assert make_tool_parser is not None  # the capabilities refused tools otherwise
    streams: list[ToolStream] = []
    overrides: dict[str, Any] = {}
    for _ in range(sampling.n):
        parser, chat_request, overrides = make_tool_parser(tokenizer, sampling.tools, sampling.tool_choice)
        streams.append(ParsedToolStream(parser, chat_request))
    return streams, overrides
