"""The remote_openai adapter against a real fake OpenAI server on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import AsyncIterator, Iterator

import pytest

from cluster.config import RemoteOpenAIEngineConfig
from cluster.errors import (
    ConfigError,
    EngineError,
    EngineTimeoutError,
    EngineUnavailableError,
    SLMError,
)
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from deployments.engines import create_engine
from deployments.engines.common import penalty_kwargs
from deployments.engines.remote_openai import RemoteOpenAIEngine, SSEDecoder, StreamAnswer, chat_payload, status_error
from tests.fakes.openai_upstream import OpenAIUpstream

KEY_ENV = {"UPSTREAM_KEY": "sk-unit"}


def _config(base_url: str, **overrides: object) -> RemoteOpenAIEngineConfig:
    fields = dict(kind="remote_openai", base_url=base_url, model="frontier-x", api_key_env="UPSTREAM_KEY",
                  connect_timeout_s=1.0, read_timeout_s=2.0, total_timeout_s=5.0, max_connections=4)
    return RemoteOpenAIEngineConfig(**{**fields, **overrides})


def _request(max_tokens: int = 16, **sampling: object) -> GenerationRequest:
    return GenerationRequest(request_id="req-1", messages=(ChatMessage("user", "What is two plus two?"),),
                             sampling=SamplingParams(max_tokens=max_tokens, **sampling))


async def _collect(engine: RemoteOpenAIEngine, request: GenerationRequest | None = None) -> list[GenerationChunk]:
    return [c async for c in engine.generate(request or _request())]


async def _eventually(predicate, seconds: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@pytest.fixture
def upstream() -> Iterator[OpenAIUpstream]:
    with OpenAIUpstream(answer="two plus two is four", api_key="sk-unit") as up:
        yield up


@pytest.fixture
async def engine(upstream: OpenAIUpstream) -> AsyncIterator[RemoteOpenAIEngine]:
    eng = RemoteOpenAIEngine(_config(upstream.base_url), system_prompt="Be exact.", env=KEY_ENV)
    await eng.start()
    yield eng
    await eng.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- streaming -------------------------------------------------------------------------


async def test_streams_text_in_order_then_one_final_chunk_with_upstream_usage(engine, upstream) -> None:
    chunks = await _collect(engine)
    assert [c.text for c in chunks[:-1]] == ["two", " plus", " two", " is", " four"]
    final = chunks[-1]
    assert final.finish_reason == "stop" and final.text == ""
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len("Be exact. What is two plus two?".split()), 5)
    assert upstream.completed == 1 and upstream.disconnected == 0


async def test_sends_the_openai_request_with_system_prompt_and_sampling(engine, upstream) -> None:
    await _collect(engine, _request(max_tokens=7, temperature=0.3, top_p=0.9, stop=("END",), seed=11, logprobs=True))
    body = upstream.last_body
    assert body["model"] == "frontier-x" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is two plus two?"}]
    sampling = (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"], body["logprobs"])
    assert sampling == (7, 0.3, 0.9, ["END"], 11, True)


async def test_optional_fields_are_left_out_when_unused(engine, upstream) -> None:
    await _collect(engine)
    assert not {"stop", "seed", "logprobs"} & set(upstream.last_body)


async def test_api_key_comes_from_the_named_env_var(engine, upstream) -> None:
    await _collect(engine)
    assert upstream.last_authorization == "Bearer sk-unit"


async def test_the_upstream_sees_the_call_s_own_request_id(engine, upstream) -> None:
    """So an upstream's logs can be matched to the audit line; an id that is not safe in a
    header gets a fresh one instead of breaking the request."""
    import dataclasses

    await _collect(engine)
    await _collect(engine, dataclasses.replace(_request(), request_id="chat-7:remote-v1"))
    await _collect(engine, dataclasses.replace(_request(), request_id="bad id\n"))
    assert upstream.request_ids[:2] == ["req-1", "chat-7:remote-v1"]
    assert len(upstream.request_ids[2]) == 32 and upstream.request_ids[2].isalnum()


async def test_no_auth_header_without_api_key_env(upstream) -> None:
    upstream.knobs.api_key = None
    eng = RemoteOpenAIEngine(_config(upstream.base_url, api_key_env=None), env={})
    await eng.start()
    await _collect(eng)
    await eng.shutdown()
    assert upstream.last_authorization is None


@pytest.mark.parametrize("env", [{}, {"UPSTREAM_KEY": "  "}])
async def test_a_missing_api_key_fails_start_naming_the_var(env) -> None:
    eng = RemoteOpenAIEngine(_config("http://127.0.0.1:9/v1"), env=env)
    with pytest.raises(ConfigError, match="UPSTREAM_KEY"):
        await eng.start()
    with pytest.raises(EngineUnavailableError):
        await eng.check_health()


async def test_a_base_url_without_http_scheme_fails_start() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        await RemoteOpenAIEngine(_config("localhost:8000/v1"), env=KEY_ENV).start()


async def test_logprobs_are_passed_through(engine) -> None:
    chunks = await _collect(engine, _request(logprobs=True))
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token for lp in logprobs] == ["two", " plus", " two", " is", " four"]
    assert all(lp.logprob < 0 for lp in logprobs)


async def test_max_tokens_ends_with_length(engine) -> None:
    chunks = await _collect(engine, _request(max_tokens=2))
    assert "".join(c.text for c in chunks) == "two plus"
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2


async def test_usage_is_estimated_when_the_upstream_sends_none(engine, upstream) -> None:
    upstream.knobs.send_usage = False
    final = (await _collect(engine))[-1]
    prompt_chars = len("Be exact.") + len("What is two plus two?")
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (-(-prompt_chars // 4), 5)


# --- upstream error statuses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "http_status", "text"),
    [
        (400, EngineError, 502, "bad things in the request"),
        (401, EngineError, 502, "rejected our credentials"),
        (403, EngineError, 502, "rejected our credentials"),
        (404, EngineError, 502, "bad things in the request"),
        (429, EngineUnavailableError, 503, "rate-limited"),
        (500, EngineError, 502, "upstream failed"),
        (503, EngineUnavailableError, 503, "unavailable"),
        (504, EngineTimeoutError, 504, "timed out"),
    ],
)
async def test_error_statuses_map_to_typed_errors(engine, upstream, status, error, http_status, text) -> None:
    upstream.knobs.status = status
    upstream.knobs.error_message = "bad things in the request"
    with pytest.raises(error, match=text) as info:
        await _collect(engine)
    assert type(info.value) is error and info.value.http_status == http_status


async def test_auth_failure_does_not_leak_the_upstream_message(engine, upstream) -> None:
    upstream.knobs.api_key = "sk-other"  # the real 401 path: our key is wrong
    upstream.knobs.error_message = "Incorrect API key provided: sk-un***"
    with pytest.raises(EngineError) as info:
        await _collect(engine)
    assert "sk-" not in info.value.message and info.value.code == "upstream_auth_failed"


def test_status_error_reads_plain_text_bodies() -> None:
    err = status_error(502, b"<html>bad gateway</html>")
    assert type(err) is EngineError and "bad gateway" in err.message


# --- connection failures and timeouts ------------------------------------------------------


async def test_a_closed_port_is_engine_unavailable() -> None:
    eng = RemoteOpenAIEngine(_config(f"http://127.0.0.1:{_closed_port()}/v1"), env=KEY_ENV)
    await eng.start()
    with pytest.raises(EngineUnavailableError, match="cannot connect"):
        await _collect(eng)
    await eng.shutdown()


async def test_a_slow_first_byte_is_a_read_timeout_and_the_upstream_sees_us_leave(upstream) -> None:
    upstream.knobs.first_byte_delay_s = 2.0
    eng = RemoteOpenAIEngine(_config(upstream.base_url, read_timeout_s=0.2), env=KEY_ENV)
    await eng.start()
    with pytest.raises(EngineTimeoutError, match="ReadTimeout"):
        await _collect(eng)
    assert await _eventually(lambda: upstream.disconnected == 1)
    await eng.shutdown()


async def test_the_total_deadline_cuts_a_slow_stream(upstream) -> None:
    upstream.knobs.token_delay_s = 0.15  # each gap is well inside read_timeout_s
    eng = RemoteOpenAIEngine(_config(upstream.base_url, read_timeout_s=1.0, total_timeout_s=0.4), env=KEY_ENV)
    await eng.start()
    got: list[GenerationChunk] = []
    with pytest.raises(EngineTimeoutError, match="total_timeout_s"):
        async for chunk in eng.generate(_request()):
            got.append(chunk)
    assert 1 <= len(got) < 5 and all(not c.is_final for c in got)
    await eng.shutdown()


async def test_the_total_deadline_follows_the_injected_clock(upstream) -> None:
    now = [0.0]
    eng = RemoteOpenAIEngine(_config(upstream.base_url, total_timeout_s=10.0), env=KEY_ENV, clock=lambda: now[0])
    await eng.start()
    stream = eng.generate(_request())
    assert (await anext(stream)).text == "two"
    now[0] = 11.0  # ten seconds "pass" without any real waiting
    with pytest.raises(EngineTimeoutError, match="total_timeout_s=10"):
        await anext(stream)
    await eng.shutdown()


# --- broken streams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "text"),
    [("hangup", "connection failed"), ("error_event", "upstream error mid-stream: it broke"), ("eof", "ended early")],
)
async def test_a_broken_stream_is_an_engine_error_after_the_text_so_far(engine, upstream, failure, text) -> None:
    upstream.knobs.fail_after_tokens, upstream.knobs.failure, upstream.knobs.error_message = 2, failure, "it broke"
    got: list[str] = []
    with pytest.raises(EngineError, match=text) as info:
        async for chunk in engine.generate(_request()):
            got.append(chunk.text)
    assert got == ["two", " plus"] and type(info.value) is EngineError


# --- abort ---------------------------------------------------------------------------------------


async def test_closing_the_stream_disconnects_from_the_upstream(engine, upstream) -> None:
    upstream.knobs.token_delay_s = 0.05
    stream = engine.generate(_request())
    assert (await anext(stream)).text == "two"
    await stream.aclose()
    assert await _eventually(lambda: upstream.disconnected == 1)
    assert upstream.completed == 0
    assert (await _collect(engine))[-1].usage is not None  # the pool still serves


async def test_cancelling_the_consumer_aborts_and_reraises(engine, upstream) -> None:
    upstream.knobs.token_delay_s = 0.05
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(_request()):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _eventually(lambda: upstream.disconnected == 1)


# --- lifecycle -------------------------------------------------------------------------------------


async def test_health_follows_the_lifecycle_without_calling_the_upstream(upstream) -> None:
    eng = RemoteOpenAIEngine(_config(upstream.base_url), env=KEY_ENV)
    with pytest.raises(EngineUnavailableError):
        await eng.check_health()
    with pytest.raises(EngineUnavailableError):
        await _collect(eng)
    await eng.start()
    await eng.start()  # idempotent
    for _ in range(5):
        await eng.check_health()
    assert upstream.requests == 0
    await eng.shutdown()
    await eng.shutdown()  # idempotent
    with pytest.raises(EngineUnavailableError):
        await eng.check_health()


def test_create_engine_builds_the_adapter() -> None:
    eng = create_engine(_config("http://127.0.0.1:9/v1"), system_prompt="hi")
    assert isinstance(eng, RemoteOpenAIEngine) and eng.system_prompt == "hi"


def test_every_error_it_raises_is_an_slm_error() -> None:
    for status in (400, 401, 404, 408, 429, 500, 502, 503, 504):
        assert isinstance(status_error(status, b"{}"), SLMError)


# --- SSE decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "events"),
    [
        (["data: {\"a\":1}", ""], ['{"a":1}']),
        (["data:{\"a\":1}", ""], ['{"a":1}']),  # no space after the colon
        ([": keep-alive", "", "data: x", ""], ["x"]),  # comments are skipped
        (["event: message", "id: 7", "data: x", ""], ["x"]),  # other fields are skipped
        (["data: line one", "data: line two", ""], ["line one\nline two"]),
        (["", "", "data: [DONE]", ""], ["[DONE]"]),  # blank lines alone dispatch nothing
    ],
)
def test_sse_decoder(lines: list[str], events: list[str]) -> None:
    decoder = SSEDecoder()
    assert [e for e in map(decoder.feed, lines) if e is not None] == events


def test_sse_decoder_flushes_an_unterminated_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: tail") is None
    assert decoder.flush() == "tail" and decoder.flush() is None


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ('{"object": "error", "message": "CUDA out of memory"}', "mid-stream: CUDA out of memory"),  # older vLLM
        ("not json", "malformed"),
        ("[1, 2]", "non-object"),
        ('{"choices": ["oops"]}', "unreadable"),
        ('{"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [{"tok": "a"}]}}]}', "unreadable"),
    ],
)
def test_unusable_events_are_engine_errors(data: str, text: str) -> None:
    with pytest.raises(EngineError, match=text):
        StreamAnswer(want_logprobs=True).feed(data)


# --- request bodies --------------------------------------------------------------------------------


def test_penalties_and_logit_bias_are_shared_and_set_only_when_used() -> None:
    used = SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((7, -100.0), (42, 2.5)))
    assert penalty_kwargs(used, bias_keys_as_str=True) == {
        "presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"7": -100.0, "42": 2.5}}
    assert penalty_kwargs(used, bias_keys_as_str=False)["logit_bias"] == {7: -100.0, 42: 2.5}  # vLLM's int ids
    assert penalty_kwargs(SamplingParams(), bias_keys_as_str=True) == {}
    body = chat_payload("up", _request(logit_bias=((7, 1.0),), stop=("x",)), (ChatMessage("user", "hi"),))
    assert body["logit_bias"] == {"7": 1.0} and body["stop"] == ["x"] and "presence_penalty" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["stream_options"] == {"include_usage": True}


# --- whole answers (GenerationRequest.whole_answer) --------------------------------------


def _shape(chunks: list[GenerationChunk]) -> tuple:
    """What a caller reads of an answer, however it was chunked: text and logprobs and tool
    calls per choice, and the final chunk's finish, usage and per-choice reasons."""
    per: dict[int, tuple[str, tuple, dict]] = {}
    for c in chunks[:-1]:
        text, lps, calls = per.get(c.index, ("", (), {}))
        for t in c.tool_calls:  # a streamed call comes in pieces (id and name, then arguments): merged by its index
            id_, name, args = calls.get(t.index, (None, None, ""))
            calls[t.index] = (id_ or t.id, name or t.name, args + t.arguments)
        per[c.index] = (text + c.text, lps + c.logprobs, calls)
    final = chunks[-1]
    return per, final.finish_reason, final.usage, final.finish_reasons


@pytest.mark.parametrize("sampling", [
    {},
    {"logprobs": True, "top_logprobs": 2, "n": 2},
    {"tools": ({"type": "function", "function": {"name": "weather", "parameters": {}}},), "tool_choice": "required"},
])
async def test_a_whole_answer_is_one_unstreamed_call_with_the_same_content(engine: RemoteOpenAIEngine, upstream: OpenAIUpstream,
                                                                            sampling: dict) -> None:
    upstream.knobs.answer = None  # derived from the prompt: the same for both calls
    streamed = _request(**sampling)
    whole = dataclasses.replace(streamed, whole_answer=True)
    a = await _collect(engine, streamed)
    assert upstream.last_body is not None and upstream.last_body["stream"] is True
    b = await _collect(engine, whole)
    assert upstream.last_body["stream"] is False and "stream_options" not in upstream.last_body
    assert _shape(b) == _shape(a) and len(b) <= 1 + max(1, sampling.get("n", 1))  # one chunk per choice, then the final


async def test_a_whole_raw_prompt_answer(engine: RemoteOpenAIEngine, upstream: OpenAIUpstream) -> None:
    request = GenerationRequest("r", (), SamplingParams(max_tokens=4, logprobs=True), prompt="Once upon", whole_answer=True)
    chunks = await _collect(engine, request)
    assert upstream.paths[-1] == "/v1/completions" and upstream.last_body["stream"] is False
    assert "".join(c.text for c in chunks) == "two plus two is" and len(chunks[0].logprobs) == 4
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 4


async def test_an_unreadable_whole_answer_is_a_502(engine: RemoteOpenAIEngine) -> None:
    from deployments.engines.openai_wire import StreamAnswer

    with pytest.raises(EngineError) as err:
        StreamAnswer(False).feed_completion(b'{"choices": [{"message": "not an object"}]}')
    assert err.value.http_status == 502 and err.value.code == "upstream_bad_stream"
    with pytest.raises(EngineError, match="upstream error"):
        StreamAnswer(False).feed_completion(b'{"error": {"message": "overloaded"}}')
