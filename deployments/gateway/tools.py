"""Tool calls and choices on the wire: OpenAI's delta shape for streams, and the merge of
the pieces into whole calls and choices for a non-streamed answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.types import GenerationChunk, TokenLogprob, ToolCall


def tool_call_delta(call: ToolCall) -> dict[str, Any]:
    """One entry of ``choices[i].delta.tool_calls``: the first piece of a call carries
    ``id``, ``type`` and the function's ``name``; later pieces only more ``arguments``."""
    function: dict[str, Any] = {"arguments": call.arguments}
    entry: dict[str, Any] = {"index": call.index}
    if call.id is not None:
        entry["id"] = call.id
        entry["type"] = "function"
    if call.name is not None:
        function = {"name": call.name, **function}
    entry["function"] = function
    return entry


def logprob_items(logprobs: tuple[TokenLogprob, ...]) -> list[tuple[str, float, tuple[tuple[str, float], ...]]]:
    return [(lp.token, lp.logprob, lp.top) for lp in logprobs]


@dataclass
class ChoiceParts:
    """What one choice gathered so far: text, logprobs, and its tool calls by index."""

    text: list[str] = field(default_factory=list)
    logprobs: list[tuple[str, float, tuple[tuple[str, float], ...]]] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.logprobs.extend(logprob_items(chunk.logprobs))
        for piece in chunk.tool_calls:
            call = self.calls.setdefault(piece.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if piece.id is not None:
                call["id"] = piece.id
            if piece.name is not None:
                call["function"]["name"] += piece.name
            call["function"]["arguments"] += piece.arguments

    def tool_calls(self) -> list[dict[str, Any]]:
        return [self.calls[i] for i in sorted(self.calls)]


def finish_of(final: GenerationChunk, index: int) -> str:
    """Choice ``index``'s finish reason, from the final chunk of a stream."""
    if index < len(final.finish_reasons):
        return final.finish_reasons[index]
    assert final.finish_reason is not None  # the Engine contract
    return final.finish_reason


def choice_count(final: GenerationChunk, seen: set[int] | dict[int, Any]) -> int:
    return max(len(final.finish_reasons), max(seen, default=0) + 1, 1)
