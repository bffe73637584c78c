"""Small helpers every adapter shares: system prompts, message dicts, sampling penalties, stop strings."""

from __future__ import annotations

from typing import Any

from cluster.types import ChatMessage, GenerationRequest, SamplingParams


def with_system_prompt(request: GenerationRequest, system_prompt: str | None) -> tuple[ChatMessage, ...]:
    """The request's messages, with the version's system prompt first unless it brings one."""
    if system_prompt is None or any(m.role == "system" for m in request.messages):
        return request.messages
    return (ChatMessage(role="system", content=system_prompt), *request.messages)


def messages_as_dicts(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """OpenAI's message dicts (which chat templates take too): an assistant turn's tool
    calls and a tool turn's call id only when the turn has them."""
    return [_message_dict(m) for m in messages]


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls
        ]
        out["content"] = m.content or None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def penalty_kwargs(sampling: SamplingParams, *, bias_keys_as_str: bool) -> dict[str, Any]:
    """``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` as the engines take them
    (the same names everywhere), each only when the request uses it, so the engine's own
    default applies otherwise. ``logit_bias`` maps token ids to biases: int keys for vLLM's
    ``SamplingParams``, string keys (``bias_keys_as_str``) for OpenAI's JSON and SGLang."""
    out: dict[str, Any] = {}
    if sampling.presence_penalty:
        out["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        out["frequency_penalty"] = sampling.frequency_penalty
    if sampling.logit_bias:
        out["logit_bias"] = {(str(token) if bias_keys_as_str else token): bias for token, bias in sampling.logit_bias}
    return out


class StopMatcher:
    """Finds the first stop string in streamed text while holding back text that might be
    the start of one, so no client ever sees part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._buffer += text
        hits = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._buffer = self._buffer[: min(hits)], ""
            return out, True
        if self._hold == 0:
            out, self._buffer = self._buffer, ""
            return out, False
        cut = max(0, len(self._buffer) - self._hold)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
