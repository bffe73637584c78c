"""Response plumbing of /v1/completions (the legacy text completions): one
``text_completion`` body, or its SSE stream. The shapes are ``cluster.openai_endpoints``'s;
the request path is ``Gateway.completions`` (ingress.py)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from cluster.openai_endpoints import text_completion_body, text_completion_chunk
from cluster.types import GenerationChunk, TokenLogprob
from deployments.gateway.responses import Trailer, sse_stream


async def collect_text_completion(chunks: AsyncIterator[GenerationChunk], meta: dict[str, Any], *, logprobs: bool) -> dict[str, Any]:
    """The whole answer as one body; ``chunks`` is closed however this ends."""
    parts: list[str] = []
    lps: list[TokenLogprob] = []
    try:
        async for chunk in chunks:
            parts.append(chunk.text)
            lps.extend(chunk.logprobs)
            if chunk.is_final:
                assert chunk.usage is not None and chunk.finish_reason is not None  # the Engine contract
                return text_completion_body(
                    completion_id=meta["id"], created=meta["created"], model=meta["model"], text="".join(parts),
                    finish_reason=chunk.finish_reason, prompt_tokens=chunk.usage.prompt_tokens,
                    completion_tokens=chunk.usage.completion_tokens, logprobs=lps if logprobs else None,
                )
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    raise AssertionError("timed_chunks always ends with a final chunk or raises")


def text_sse_events(first: GenerationChunk, chunks: AsyncIterator[GenerationChunk], meta: dict[str, Any], *, include_usage: bool,
                    logprobs: bool, trailer: Trailer | None = None) -> AsyncIterator[str]:
    """The legacy stream: one ``text_completion`` event per text chunk, one with the
    ``finish_reason``, a usage event (empty ``choices``) when asked, then ``[DONE]``. A
    failure after the first byte ends it with an ``{"error": ...}`` event, as chat does
    (the loop is ``sse_stream``'s)."""
    common = {"completion_id": meta["id"], "created": meta["created"], "model": meta["model"]}

    def events(chunk: GenerationChunk) -> Iterator[dict[str, Any]]:
        if chunk.text:
            yield text_completion_chunk(**common, text=chunk.text, logprobs=list(chunk.logprobs) if logprobs else None)
        if chunk.is_final:
            yield text_completion_chunk(**common, finish_reason=chunk.finish_reason)

    return sse_stream(first, chunks, events, lambda usage: text_completion_chunk(**common, usage=usage, with_choice=False),
                      include_usage=include_usage, trailer=trailer)
