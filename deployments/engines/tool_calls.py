"""Function calling on the in-process engines: the model writes its calls as text, in its own
format; these pure helpers turn that text into OpenAI tool-call pieces (``ToolCall``).

What a request's ``tool_choice`` asks for (the behaviour of vLLM's own OpenAI server,
``serving_chat``, followed here; checked against vLLM main, ``vllm/tool_parsers/``, which
was ``vllm/entrypoints/openai/tool_parsers/`` up to 0.11):

- ``"none"``: a plain text answer (the tools still reach the chat template, as in vLLM).
- ``"auto"`` or no ``tool_choice``: the version's configured tool parser (vLLM's
  ``ToolParser``, e.g. ``hermes``, ``llama3_json``) reads each choice's deltas with
  ``extract_tool_calls_streaming(previous_text, current_text, delta_text, previous_token_ids,
  current_token_ids, delta_token_ids, request)``, which returns a ``DeltaMessage`` (``content``,
  ``tool_calls``: ``DeltaToolCall(index, id, type, function=DeltaFunctionCall(name,
  arguments))``) or ``None`` while it holds text back. A choice that called a tool ends with
  finish reason ``tool_calls``. At the end, arguments the parser parsed but never streamed
  (``prev_tool_call_arr`` against ``streamed_args_for_tool``) are sent, as vLLM's server does.
- a named function: decoding is constrained to that function's parameter schema, so the
  whole answer is the call's arguments, streamed as they come.
- ``"required"``: decoding is constrained to a JSON array of ``{"name", "parameters"}``
  (vLLM's ``get_json_schema_from_tools``); the calls go out when the choice ends.

The gateway checks that ``tool_choice`` names a function among ``tools``; the adapters do
not check again.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol, Sequence

from cluster.errors import EngineError
from cluster.types import GenerationChunk, SamplingParams, TokenLogprob, ToolCall


class ToolStream(Protocol):
    """One choice's answer read as text and tool calls."""

    called: bool  # whether the choice made at least one call

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, tuple[ToolCall, ...]]:
        """(the text to show as content, the call pieces) for one delta."""
        ...

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """(text the parser held back, the pieces still owed) when the choice ends."""
        ...


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_mode(sampling: SamplingParams) -> str | None:
    """``None`` (no tools, or ``"none"``), ``"auto"``, ``"required"`` or ``"named"``."""
    choice = sampling.tool_choice
    if not sampling.tools or choice == "none":
        return None
    if choice is None or choice == "auto":
        return "auto"
    return "required" if choice == "required" else "named"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function") or {}


def named_function(sampling: SamplingParams) -> dict[str, Any]:
    """The function a named ``tool_choice`` forces (the gateway checked it is in ``tools``)."""
    assert isinstance(sampling.tool_choice, dict)
    name = sampling.tool_choice["function"]["name"]
    return next(_function(t) for t in sampling.tools if _function(t).get("name") == name)


def forced_schema(sampling: SamplingParams) -> dict[str, Any] | None:
    """The JSON schema decoding is held to for a forced call (named or ``required``), else None."""
    mode = tool_mode(sampling)
    if mode == "named":
        return named_function(sampling).get("parameters") or {"type": "object", "properties": {}}
    if mode == "required":
        choices = [
            {"properties": {"name": {"type": "string", "enum": [_function(t)["name"]]},
                            "parameters": _function(t).get("parameters") or {"type": "object", "properties": {}}},
             "required": ["name", "parameters"]}
            for t in sampling.tools
        ]
        return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": choices}}
    return None


class NamedCallStream:
    """A named ``tool_choice``: the answer is the arguments of one call to that function."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, tuple[ToolCall, ...]]:
        if not text:
            return "", ()
        if not self.called:
            self.called = True
            return "", (ToolCall(index=0, id=call_id(), name=self._name, arguments=text),)
        return "", (ToolCall(index=0, arguments=text),)

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        if self.called:
            return "", ()
        self.called = True  # an empty answer is still the forced call, with empty arguments
        return "", (ToolCall(index=0, id=call_id(), name=self._name, arguments="{}"),)


class RequiredCallsStream:
    """``tool_choice: "required"``: the answer is a JSON array of calls, sent when it is whole."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, tuple[ToolCall, ...]]:
        self._text.append(text)
        return "", ()

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        text = "".join(self._text)
        try:
            calls = json.loads(text)
            out = tuple(ToolCall(index=i, id=call_id(), name=str(c["name"]), arguments=json.dumps(c.get("parameters") or {}))
                        for i, c in enumerate(calls))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # Decoding was held to the schema; an answer outside it was cut (max_tokens).
            raise EngineError(f"the model's forced tool calls are not the JSON array asked for ({exc}): {text[:200]!r}") from exc
        self.called = bool(out)
        return "", out


class ParsedToolStream:
    """Drives one vLLM ``ToolParser`` (duck-typed) over one choice's deltas.

    ``parser``: a fresh parser instance (they keep per-answer state); ``request``: the
    ``ChatCompletionRequest`` it reads ``tools`` and ``tool_choice`` from. A parser that raises
    is the deployment's problem (an ``EngineError``), not the client's.
    """

    def __init__(self, parser: Any, request: Any) -> None:
        self._parser = parser
        self._request = request
        self._text = ""
        self._ids: list[int] = []
        self._ids_seen: set[int] = set()  # call indices whose first piece went out
        self._named: set[int] = set()  # call indices whose name went out
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, tuple[ToolCall, ...]]:
        previous_text, previous_ids = self._text, list(self._ids)
        self._text += text
        self._ids.extend(token_ids)
        if not text and not token_ids:
            return "", ()
        try:
            delta = self._parser.extract_tool_calls_streaming(
                previous_text, self._text, text, previous_ids, list(self._ids), list(token_ids), self._request
            )
        except Exception as exc:
            raise EngineError(f"the tool parser failed: {type(exc).__name__}: {exc}") from exc
        if delta is None:
            return "", ()
        return delta.content or "", self._calls(getattr(delta, "tool_calls", None) or ())

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """Arguments the parser parsed but did not stream (vLLM's server sends them too)."""
        return "", unstreamed_arguments(self._parser, self.called)

    def _calls(self, pieces: Sequence[Any]) -> tuple[ToolCall, ...]:
        out = []
        for piece in pieces:
            index = int(getattr(piece, "index", 0) or 0)
            function = getattr(piece, "function", None)
            name = getattr(function, "name", None) if function is not None else None
            arguments = (getattr(function, "arguments", None) or "") if function is not None else ""
            first = index not in self._ids_seen
            if first:
                self._ids_seen.add(index)
                self.called = True
            # The first piece of a call carries its id and name (the gateway's merge relies on it).
            ident = (getattr(piece, "id", None) or call_id()) if first else None
            if name and index in self._named:
                name = None  # sent once: the gateway's merge appends names
            elif name:
                self._named.add(index)
            out.append(ToolCall(index=index, id=ident, name=name, arguments=arguments))
        return tuple(out)


def unstreamed_arguments(state: Any, called: bool) -> tuple[ToolCall, ...]:
    """The end of the last call's arguments when a parser parsed more than it streamed
    (``prev_tool_call_arr`` against ``streamed_args_for_tool``, kept by vLLM's ``ToolParser``
    and SGLang's ``BaseFormatDetector`` alike); both servers send it when the answer ends."""
    parsed = getattr(state, "prev_tool_call_arr", None) or []
    streamed = getattr(state, "streamed_args_for_tool", None) or []
    index = len(parsed) - 1
    if not called or index < 0 or index >= len(streamed):
        return ()
    arguments = parsed[index].get("arguments", parsed[index].get("parameters", {}))
    expected = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    sent = streamed[index]
    if expected.startswith(sent) and len(expected) > len(sent):
        return (ToolCall(index=index, arguments=expected[len(sent):]),)
    return ()


class DetectorToolStream:
    """Drives one SGLang ``FunctionCallParser`` (duck-typed; ``sglang.srt.function_call``,
    checked against SGLang main) over one choice's deltas: ``parse_stream_chunk(text)`` gives
    (normal text, ``ToolCallItem(tool_index, name, parameters)``), the name only on a call's
    first item, ``parameters`` the arguments' new characters; ``parse_stream_end()`` (newer
    releases) releases text held back waiting for a marker. The ids are ours (SGLang's server
    makes them the same way, ``call_`` + hex)."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._started: set[int] = set()
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, tuple[ToolCall, ...]]:
        if not text:
            return "", ()
        try:
            normal, items = self._parser.parse_stream_chunk(text)
        except Exception as exc:
            raise EngineError(f"the tool parser failed: {type(exc).__name__}: {exc}") from exc
        return normal or "", self._calls(items or ())

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        text, calls = "", ()
        end = getattr(self._parser, "parse_stream_end", None)
        if end is not None:
            try:
                text, items = end()
            except Exception as exc:
                raise EngineError(f"the tool parser failed: {type(exc).__name__}: {exc}") from exc
            calls = self._calls(items or ())
        owed = unstreamed_arguments(getattr(self._parser, "detector", self._parser), self.called)
        return text or "", calls + owed

    def _calls(self, items: Sequence[Any]) -> tuple[ToolCall, ...]:
        out = []
        for item in items:
            index = int(getattr(item, "tool_index", 0) or 0)
            name = getattr(item, "name", None)
            first = index not in self._started and bool(name)
            if first:
                self._started.add(index)
                self.called = True
            out.append(ToolCall(index=index, id=call_id() if first else None, name=name if first else None,
                                arguments=getattr(item, "parameters", None) or ""))
        return tuple(out)


class ToolChoices:
    """Each choice's ``ToolStream`` between the engine's text and the choice's assembler:
    ``split`` gives (content text, its logprobs, call chunks) for one delta, ``close`` the
    held-back content and owed call chunks when the choice ends, and whether it called."""

    def __init__(self, streams: Sequence[ToolStream]) -> None:
        self._streams = list(streams)

    def __bool__(self) -> bool:
        return bool(self._streams)

    def split(self, index: int, text: str, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]
              ) -> tuple[str, Sequence[TokenLogprob], list[GenerationChunk]]:
        content, calls = self._streams[index].feed(text, token_ids)
        # tokens that went into a call have no place in the content's logprobs
        kept = logprobs if content == text else ()
        return content, kept, [GenerationChunk(index=index, tool_calls=calls)] if calls else []

    def close(self, index: int) -> tuple[str, list[GenerationChunk], bool]:
        stream = self._streams[index]
        content, calls = stream.finish()
        return content, [GenerationChunk(index=index, tool_calls=calls)] if calls else [], stream.called
