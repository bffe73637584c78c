"""What each answer cost: USD and joules for every call a request made, cancelled ones
included, and what the frontier alone would have cost. Pure arithmetic over the config's
cost blocks."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import ClusterConfig, CostConfig

# outcome of one model call
WON, LOST, CANCELLED, FAILED = "won", "lost", "cancelled", "failed"


@dataclass(frozen=True)
class CallRecord:
    model: str
    version: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    latency_s: float
    usage_exact: bool = True  # False when the call ended before the engine reported usage


@dataclass(frozen=True)
class Cost:
    usd: float
    joules: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.usd + other.usd, self.joules + other.joules)


ZERO = Cost(0.0, 0.0)


def price(cost: CostConfig, prompt_tokens: int, completion_tokens: int) -> Cost:
    usd = (prompt_tokens * cost.usd_per_million_input_tokens + completion_tokens * cost.usd_per_million_output_tokens) / 1e6
    return Cost(usd, completion_tokens * cost.joules_per_token)


def call_cost(cfg: ClusterConfig, call: CallRecord) -> Cost:
    model = cfg.model(call.model)
    version = model.version(call.version) if model is not None else None
    if version is None:
        return ZERO
    return price(version.cost, call.prompt_tokens, call.completion_tokens)


def total(cfg: ClusterConfig, calls: list[CallRecord]) -> Cost:
    out = ZERO
    for call in calls:
        out = out + call_cost(cfg, call)
    return out


def frontier_only(cfg: ClusterConfig, prompt_tokens: int, completion_tokens: int) -> Cost | None:
    """The frontier's price for the request's input tokens and this answer's output tokens
    (None without a frontier model)."""
    frontier = cfg.frontier
    if frontier is None:
        return None
    return price(frontier.current.cost, prompt_tokens, completion_tokens)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters a token for English), used only for
    calls that were cancelled before their engine reported usage."""
    return max(1, (len(text) + 3) // 4)


@dataclass(frozen=True)
class Bill:
    """One request's figures, computed once: its call records, what each cost, what they
    cost together (cancelled calls included), and what the frontier alone would have cost.
    The response headers, the key's settlement, the audit line and the metrics all report
    these."""

    records: tuple[CallRecord, ...]
    costs: tuple[Cost, ...]  # one per record
    spent: Cost
    alone: Cost | None


def bill(cfg: ClusterConfig, calls: list[CallRecord]) -> Bill:
    """The frontier-alone figure is its input tokens as the frontier counted them when it
    ran, else the answering engine's, and the winning answer's output tokens, at the
    frontier's prices (None without a frontier model)."""
    costs = tuple(call_cost(cfg, c) for c in calls)
    spent = ZERO
    for cost in costs:
        spent = spent + cost
    won = next(r for r in calls if r.outcome == WON)
    frontier = cfg.frontier
    ran = [r for r in calls if frontier is not None and r.model == frontier.name and r.usage_exact]
    prompt = ran[0].prompt_tokens if ran else won.prompt_tokens
    return Bill(tuple(calls), costs, spent, frontier_only(cfg, prompt, won.completion_tokens))
