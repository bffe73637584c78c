"""Internal generation types that cross the Ray boundary between gateway and ModelServer.

Plain frozen dataclasses: cheap to pickle, no validation cost on the hot path (the wire
schema in ``cluster.openai_schema`` validates at the edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float


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

    Every chunk but the last carries text (and, when asked, one logprob per token in it).
    The last chunk of a stream always has ``finish_reason`` and ``usage`` set.
    """

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineCapabilities:
    streaming: bool = True
    logprobs: bool = False


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
