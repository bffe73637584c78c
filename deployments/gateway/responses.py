"""Turn internal chunks into OpenAI response bodies: one JSON body, or SSE events."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from cluster.openai_schema import choice_body, chunk_body, completion_body, usage_body
from cluster.types import GenerationChunk
from deployments.gateway.errors import to_slm_error
from deployments.gateway.tools import ChoiceParts, choice_count, finish_of, logprob_items, tool_call_delta


async def collect_completion(chunks: AsyncIterator[GenerationChunk], meta: dict[str, Any], *, logprobs: bool) -> dict[str, Any]:
    """One chat.completion body, every choice (``n``) with its text, tool calls and
    logprobs. ``chunks`` is closed however this ends (a final chunk, an error, or the
    client leaving), explicitly rather than by garbage collection."""
    parts: dict[int, ChoiceParts] = {}
    try:
        async for chunk in chunks:
            if chunk.text or chunk.tool_calls or chunk.logprobs:
                parts.setdefault(chunk.index, ChoiceParts()).add(chunk)
            if chunk.is_final:
                assert chunk.usage is not None and chunk.finish_reason is not None  # the Engine contract
                choices = []
                for index in range(choice_count(chunk, parts)):
                    got = parts.get(index, ChoiceParts())
                    choices.append(choice_body(index, "".join(got.text), finish_of(chunk, index),
                                               got.logprobs if logprobs else None, got.tool_calls()))
                return completion_body(
                    completion_id=meta["id"],
                    created=meta["created"],
                    model=meta["model"],
                    text="",
                    finish_reason=chunk.finish_reason,
                    usage=usage_body(chunk.usage.prompt_tokens, chunk.usage.completion_tokens),
                    logprobs=None,
                    choices=choices,
                )
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    raise AssertionError("timed_chunks always ends with a final chunk or raises")


def sse_event(body: dict[str, Any]) -> str:
    """One server-sent event holding ``body`` as compact JSON (chat and legacy streams)."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


# The events one chunk of a stream goes out as (its deltas; on the final chunk, the finish events).
ChunkEvents = Callable[[GenerationChunk], Iterable[dict[str, Any]]]
# Facts known only at the end of a stream (the answer's cost), sent as its trailer line.
Trailer = Callable[[], dict[str, str]]


async def sse_stream(
    first: GenerationChunk,
    chunks: AsyncIterator[GenerationChunk],
    events: ChunkEvents,
    usage_event: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    include_usage: bool,
    trailer: Trailer | None = None,
    opening: Iterable[dict[str, Any]] = (),
) -> AsyncIterator[str]:
    """The loop of every OpenAI stream (chat and legacy): the ``opening`` events, then
    ``events(chunk)`` for each chunk from ``first`` to the final one, then the usage event
    (``usage_event(usage)``) when ``include_usage``, the trailer, and ``[DONE]``. A failure
    after the first byte ends the stream with an ``{"error": ...}`` event (the OpenAI SDK
    raises it as an APIError). ``chunks`` is closed however this ends.

    ``trailer()`` gives facts known only at the end (the answer's cost): they go out as one
    SSE comment line before ``[DONE]`` (``: x-slm-trailer {...}``), which SSE clients,
    the OpenAI SDKs included, skip; the response headers left before they were known."""
    try:
        for body in opening:
            yield sse_event(body)
        chunk = first
        while True:
            for body in events(chunk):
                yield sse_event(body)
            if chunk.is_final:
                if include_usage and chunk.usage is not None:
                    yield sse_event(usage_event(usage_body(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)))
                if trailer is not None:
                    yield f": x-slm-trailer {json.dumps(trailer(), separators=(',', ':'))}\n\n"
                yield "data: [DONE]\n\n"
                return
            chunk = await chunks.__anext__()
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error goes in the stream
        yield sse_event(to_slm_error(exc).to_openai())
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def sse_events(first: GenerationChunk, chunks: AsyncIterator[GenerationChunk], meta: dict[str, Any], *, include_usage: bool,
               logprobs: bool, trailer: Trailer | None = None) -> AsyncIterator[str]:
    """OpenAI's chat stream: a role delta, content and tool-call deltas, a finish chunk per
    choice, an optional usage chunk, the trailer, then ``[DONE]``; failures and the trailer
    as ``sse_stream`` says."""
    common = {"completion_id": meta["id"], "created": meta["created"], "model": meta["model"]}
    started = {0}  # choices whose role delta went out; choice 0's goes first, the others' with their first piece

    def events(chunk: GenerationChunk) -> Iterator[dict[str, Any]]:
        if chunk.text or chunk.tool_calls:
            lps = logprob_items(chunk.logprobs) if logprobs and chunk.text else None
            delta: dict[str, Any] = {} if chunk.index in started else {"role": "assistant"}
            started.add(chunk.index)
            if chunk.text:
                delta["content"] = chunk.text
            if chunk.tool_calls:
                delta["tool_calls"] = [tool_call_delta(call) for call in chunk.tool_calls]
            yield chunk_body(**common, delta=delta, logprobs=lps, index=chunk.index)
        if chunk.is_final:
            for index in range(choice_count(chunk, started)):
                yield chunk_body(**common, delta={}, finish_reason=finish_of(chunk, index), index=index)

    return sse_stream(
        first, chunks, events, lambda usage: chunk_body(**common, delta={}, usage=usage, with_choice=False),
        include_usage=include_usage, trailer=trailer, opening=[chunk_body(**common, delta={"role": "assistant", "content": ""})],
    )


async def anext_or_close(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    """The first chunk; on any failure the stream is closed (cancelling the replica's work)."""
    try:
        return await chunks.__anext__()
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise
