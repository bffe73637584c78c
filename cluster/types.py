"""Internal generation types that cross the Ray boundary between gateway and ModelServer.

Plain frozen dataclasses: cheap to pickle, no validation cost on the hot path (the wire
schema in ``cluster.openai_schema`` validates at the edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


@dataclass(frozen=True)
class ToolCall:
    """One function call of an answer, or a piece of one in a stream (OpenAI's delta: the
    first piece of call ``index`` has ``id`` and ``name``, later ones more ``arguments``)."""

    index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    # an assistant turn that called tools, and a tool turn's answer to one of those calls
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    # OpenAI's optional features (cluster/capabilities.py says which engine honours which);
    # the defaults mean "not asked for". JSON-like values are kept as the client sent them.
    top_logprobs: int = 0
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # A raw text prompt (/v1/completions): sent as is, no chat template, no system prompt;
    # ``messages`` is then empty. Only engines with ``capabilities.raw_prompt`` take one.
    prompt: str | None = None
    # Sampling fields the client left out, which a version's ``defaults`` may fill
    # (``cluster.openai_endpoints.apply_defaults``, in the ModelServer).
    unset_sampling: frozenset[str] = frozenset()
    # The caller takes the answer only once it is whole (a non-streamed request that no
    # gate reads early): an engine may fetch it unstreamed (``remote_openai``: one JSON body
    # instead of an event per token, docs/benchmarks.md "Front door"), and for such an
    # engine the gateway's first-token deadline gives way to the whole answer's.
    whole_answer: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens at this position (top_logprobs)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a generation stream.

    Every chunk but the last carries text or tool-call pieces (and, when asked, one logprob
    per token in it) for choice ``index`` (0 unless the request asked for ``n`` > 1).
    The last chunk of a stream always has ``finish_reason`` and ``usage`` set; usage counts
    every choice, and ``finish_reasons`` holds each choice's reason by index when n > 1.
    """

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    index: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reasons: tuple[FinishReason, ...] = ()

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineCapabilities:
    streaming: bool = True
    logprobs: bool = False
    raw_prompt: bool = False  # takes GenerationRequest.prompt (/v1/completions)
    # the optional OpenAI request parameters the engine honours (names as on the wire,
    # cluster/capabilities.py FEATURES); any other one asked for is refused with a 400
    params: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RouteQuery:
    """What the router reads of a conversation: the request (the last user turn) and the
    earlier user turns as context, most recent first. Assistant turns are left out: they
    are the models' own long answers, and the user's turns carry the intent."""

    request: str
    context: tuple[str, ...] = ()


def as_query(item: "str | RouteQuery") -> RouteQuery:
    """A plain string is a one-turn conversation."""
    return item if isinstance(item, RouteQuery) else RouteQuery(item)


@dataclass(frozen=True)
class RouteScores:
    """What a RouterModel says about one request."""

    domain: str
    domain_probs: dict[str, float]
    escalation_score: float = 0.0
    escalation_threshold: float | None = None  # the router's calibrated bar, if it has one

    @property
    def confidence(self) -> float:
        return self.domain_probs.get(self.domain, 0.0)


@dataclass(frozen=True)
class RouteDecision:
    """Which model version serves a request, and why."""

    model: str
    version: str
    reason: str
    domain: str | None = None
    confidence: float | None = None
    escalation_score: float | None = None
    escalation_threshold: float | None = None

    @property
    def deployment_name(self) -> str:
        return deployment_name(self.model, self.version)

    @property
    def served_name(self) -> str:
        return f"{self.model}@{self.version}"


def deployment_name(model: str, version: str) -> str:
    """The Ray Serve deployment name of one model version, e.g. ``code-v1``."""
    return f"{model}-{version}"
