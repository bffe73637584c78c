"""Which optional OpenAI request parameters each engine kind honours, and the checks.

A pure table keyed by engine kind, so the gateway can refuse a request before any model
call without importing an engine library; the adapters declare the same sets in their
``EngineCapabilities.params`` (a unit test holds the two equal) and refuse too, in case a
request reaches them some other way. A parameter an engine cannot honour is a 400
(``invalid_request_error``, ``code: unsupported_parameter``, ``param`` naming it): never
accepted and silently dropped.
"""

from __future__ import annotations

from typing import Iterable

from cluster.config import ClusterConfig, EngineConfig
from cluster.errors import InvalidRequestError
from cluster.types import EngineCapabilities, GenerationRequest, RouteDecision, SamplingParams

# Wire names, in the order a refusal names the first missing one.
FEATURES = (
    "tools",
    "tool_choice",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stop",
    "top_logprobs",
    "n",
)

# vLLM and SGLang's in-process engines take penalties, logit_bias, structured output,
# top_logprobs and n (several outputs per request, each tagged with its index) in their
# sampling options. Tool calls are read out of the answer by a model-specific parser (vLLM's
# ToolParser, SGLang's FunctionCallParser), so a vllm or sglang version honours tools and
# tool_choice only when its config names a ``tool_parser``: the adapter's instance drops them
# otherwise and refuses them with a 400, and the gateway's check must look at the version's
# config for the same reason (these rows say what the kind can do with a parser). hf streams
# one sequence through its own batcher: stop strings only.
ENGINE_PARAMS: dict[str, frozenset[str]] = {
    "remote_openai": frozenset(FEATURES),
    "fake": frozenset({"tools", "tool_choice", "response_format", "stop", "top_logprobs", "n"}),
    "vllm": frozenset(FEATURES),
    "sglang": frozenset(FEATURES),
    "hf": frozenset({"stop"}),
}

UNSUPPORTED = "unsupported_parameter"


def requested(sampling: SamplingParams) -> tuple[str, ...]:
    """The optional parameters a request really uses (defaults and no-ops left out)."""
    used = {
        "tools": bool(sampling.tools),
        "tool_choice": sampling.tool_choice is not None,
        "response_format": sampling.response_format is not None and sampling.response_format.get("type") != "text",
        "presence_penalty": sampling.presence_penalty != 0,
        "frequency_penalty": sampling.frequency_penalty != 0,
        "logit_bias": bool(sampling.logit_bias),
        "stop": bool(sampling.stop),
        "top_logprobs": sampling.top_logprobs > 0,
        "n": sampling.n > 1,
    }
    return tuple(name for name in FEATURES if used[name])


def engine_params(kind: str) -> frozenset[str]:
    return ENGINE_PARAMS.get(kind, frozenset())


# Engine kinds whose tool calls need a parser named in the version's config.
NEEDS_TOOL_PARSER = frozenset({"vllm", "sglang"})


# Engine kinds that honour GenerationRequest.whole_answer: a non-streamed request is fetched
# from the upstream as one JSON body, so its first chunk arrives with its last and the
# gateway must not hold it to the first-token limit. The in-process engines stream anyway.
WHOLE_ANSWER_KINDS = frozenset({"remote_openai"})


def fetches_whole(engine: EngineConfig) -> bool:
    return engine.kind in WHOLE_ANSWER_KINDS


def version_params(engine: EngineConfig) -> frozenset[str]:
    """What one version's engine config honours: its kind's row, less tools and tool_choice
    for a vllm or sglang version without a ``tool_parser`` (the adapters declare the same)."""
    params = engine_params(engine.kind)
    if engine.kind in NEEDS_TOOL_PARSER and getattr(engine, "tool_parser", None) is None:
        params = params - {"tools", "tool_choice"}
    return params


def decision_params(cfg: ClusterConfig, decision: RouteDecision) -> frozenset[str]:
    """What the model version a decision names honours (nothing for an unknown one)."""
    model = cfg.model(decision.model)
    version = model.version(decision.version) if model is not None else None
    return version_params(version.engine) if version is not None else frozenset()


def first_missing(supported: frozenset[str], needed: Iterable[str]) -> str | None:
    return next((name for name in needed if name not in supported), None)


def capable(cfg: ClusterConfig, decision: RouteDecision, needed: tuple[str, ...]) -> bool:
    return first_missing(decision_params(cfg, decision), needed) is None


def unsupported_error(param: str, served_by: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The parameter {param!r} is not supported by the model {served_by!r}; no model that serves this request can honour it.",
        param=param,
        code=UNSUPPORTED,
    )


def check_decision(cfg: ClusterConfig, decision: RouteDecision, needed: tuple[str, ...]) -> None:
    """Raise the 400 naming the first parameter the decision's engine cannot honour."""
    missing = first_missing(decision_params(cfg, decision), needed)
    if missing is not None:
        raise unsupported_error(missing, decision.served_name)


def refuse_unsupported(capabilities: EngineCapabilities, request: GenerationRequest, engine: str) -> None:
    """The adapters' own check (defence in depth): the 400 the gateway would have given."""
    missing = first_missing(capabilities.params, requested(request.sampling))
    if missing is not None:
        raise unsupported_error(missing, engine)
