"""The SGLang adapter against a small in-process fake of ``sglang.Engine`` (no SGLang, no GPU).

The fake streams what SGLang's ``async_generate(..., stream=True)`` streams: dicts with
``text`` (cumulative by default) and ``meta_info`` (``prompt_tokens``, ``completion_tokens``,
``finish_reason``, ``output_token_logprobs`` as ``(logprob, token_id, text_or_None)``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest

from cluster.config import SGLangEngineConfig
from cluster.errors import ContextLengthExceededError, EngineError, EngineUnavailableError, InvalidRequestError, RateLimitedError
from cluster.protocols import Engine
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob, Usage
from deployments.engines import create_engine
from deployments.engines.sglang import SGLangEngine, engine_kwargs, sampling_params, streams_cumulative_text

LENGTH = {"type": "length", "length": 3}
EOS = {"type": "stop", "matched": 2}  # an EOS token id


def outputs(
    pieces: list[str],
    finish: dict[str, Any] | None,
    *,
    logprobs: list[tuple[float, int, str | None]] | None = None,
    cumulative: bool = True,
) -> list[dict[str, Any]]:
    """SGLang's stream for an answer produced one piece per step."""
    result, text, seen = [], "", []
    for n, piece in enumerate(pieces):
        text = text + piece if cumulative else piece
        meta: dict[str, Any] = {
            "id": "rid",
            "prompt_tokens": 5,
            "completion_tokens": n + 1,
            "finish_reason": finish if n == len(pieces) - 1 else None,
        }
        if logprobs is not None:
            seen = [*seen, logprobs[n]] if cumulative else [logprobs[n]]
            meta["output_token_logprobs"] = list(seen)
        result.append({"text": text, "output_ids": list(range(n + 1)), "meta_info": meta})
    return result


class FakeTokenizer:
    """Renders ``<role>content`` and counts one token per message plus one for the prompt."""

    def apply_chat_template(self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<assistant>"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        assert add_special_tokens is False
        return [len(part) for part in text.split("<") if part]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(f"t{i}" for i in token_ids)


@dataclass
class FakeTokenizerManager:
    events: list[tuple[str, str]]
    tokenizer: Any = field(default_factory=FakeTokenizer)

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.events.append(("abort", rid))


@dataclass
class HTTPException(Exception):  # what fastapi raises from SGLang's tokenizer manager
    status_code: int
    detail: str


@dataclass
class FakeSGLang:
    """Plays ``script`` for every request (an Exception item is raised there); ``on_call`` is
    raised by ``async_generate`` itself; with ``hang`` the stream then waits until closed."""

    script: list[Any] = field(default_factory=list)
    hang: bool = False
    on_call: Exception | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    shutdowns: int = 0

    def __post_init__(self) -> None:
        self.tokenizer_manager = FakeTokenizerManager(self.events)

    async def async_generate(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(kwargs)
        if self.on_call is not None:
            raise self.on_call
        assert kwargs["stream"] is True
        return self._stream(kwargs["rid"])

    async def _stream(self, rid: str) -> AsyncIterator[dict[str, Any]]:
        try:
            for item in self.script:
                await asyncio.sleep(0)
                if isinstance(item, Exception):
                    raise item
                yield item
            if self.hang:
                await asyncio.Event().wait()
        except (GeneratorExit, asyncio.CancelledError):
            self.events.append(("closed", rid))
            raise

    def shutdown(self) -> None:
        self.shutdowns += 1

    @property
    def aborted(self) -> list[str]:
        return [rid for event, rid in self.events if event == "abort"]


# SGLang's own (cumulative) stream, so that these scripted tests exercise the delta mapping;
# the adapter's default (incremental) is covered in test_sglang_engine_fake.py.
CONFIG = SGLangEngineConfig(kind="sglang", model_path="org/tiny", extra_engine_args={"incremental_streaming_output": False})


async def started(fake: FakeSGLang, config: SGLangEngineConfig = CONFIG, **kwargs: Any) -> SGLangEngine:
    engine = SGLangEngine(config, engine_factory=lambda **_: fake, **kwargs)
    await engine.start()
    return engine


def request(rid: str = "req-1", **sampling: Any) -> GenerationRequest:
    return GenerationRequest(request_id=rid, messages=(ChatMessage("user", "hi"),), sampling=SamplingParams(**sampling))


async def collect(engine: SGLangEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(req)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


# --- import, construction, config mapping ------------------------------------------------


def test_module_imports_without_sglang() -> None:
    if importlib.util.find_spec("sglang") is None:
        assert "sglang" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
async def test_start_without_sglang_says_how_to_install() -> None:
    with pytest.raises(EngineUnavailableError, match=r"slm-cluster\[sglang\]"):
        await SGLangEngine(CONFIG).start()


def test_factory_and_protocol() -> None:
    engine = create_engine(CONFIG, system_prompt="Be brief.")
    assert isinstance(engine, SGLangEngine) and isinstance(engine, Engine)
    assert engine.capabilities.streaming and engine.capabilities.logprobs


def test_engine_kwargs_from_config() -> None:
    default = SGLangEngineConfig(kind="sglang", model_path="org/tiny")
    assert engine_kwargs(default) == {
        "model_path": "org/tiny", "tp_size": 1, "mem_fraction_static": 0.85, "dtype": "auto", "incremental_streaming_output": True,
    }
    assert not streams_cumulative_text(default)
    cfg = SGLangEngineConfig(kind="sglang", model_path="m", context_length=2048, extra_engine_args={"dtype": "half", "log_level": "info"})
    kwargs = engine_kwargs(cfg)
    assert kwargs["context_length"] == 2048 and kwargs["dtype"] == "half" and kwargs["log_level"] == "info"
    assert streams_cumulative_text(CONFIG)
    assert not streams_cumulative_text(SGLangEngineConfig(kind="sglang", model_path="m", extra_engine_args={"incremental_streaming_output": True}))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (SamplingParams(), {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}),
        (
            SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, stop=("\n", "END"), seed=42, logprobs=True),
            {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop": ["\n", "END"], "sampling_seed": 42},
        ),
    ],
)
def test_sampling_params_mapping(ours: SamplingParams, theirs: dict[str, Any]) -> None:
    assert sampling_params(ours) == theirs


# --- request and output mapping ----------------------------------------------------------


async def test_request_is_token_ids_from_the_chat_template() -> None:
    fake = FakeSGLang(script=outputs(["ok"], EOS))
    await collect(await started(fake, system_prompt="Be brief."), request(max_tokens=3, logprobs=True))
    call = fake.calls[0]
    assert call["input_ids"] == [len("system>Be brief."), len("user>hi"), len("assistant>")]
    assert call["sampling_params"] == {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0}
    assert call["return_logprob"] is True and call["stream"] is True
    assert len(call["rid"]) == 32 and "req-1" not in call["rid"]  # our own id, never the client's


async def test_cumulative_text_becomes_deltas_then_one_final_chunk() -> None:
    fake = FakeSGLang(script=outputs(["Hel", "lo", "!"], LENGTH))
    chunks = await collect(await started(fake), request(max_tokens=3))
    assert [c.text for c in chunks] == ["Hel", "lo", "!", ""]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(prompt_tokens=5, completion_tokens=3)


async def test_incremental_streaming_output_is_passed_through() -> None:
    config = SGLangEngineConfig(kind="sglang", model_path="m", extra_engine_args={"incremental_streaming_output": True})
    fake = FakeSGLang(script=outputs(["Hel", "lo"], EOS, logprobs=[(-0.1, 7, "Hel"), (-0.2, 8, "lo")], cumulative=False))
    chunks = await collect(await started(fake, config), request(logprobs=True))
    assert [c.text for c in chunks] == ["Hel", "lo", ""]
    assert [lp.token for c in chunks for lp in c.logprobs] == ["Hel", "lo"]


async def test_logprobs_new_ones_only_and_decoded_when_sglang_gives_no_text() -> None:
    fake = FakeSGLang(script=outputs(["a", "b", "c"], EOS, logprobs=[(-0.1, 7, None), (-0.2, 8, None), (-0.3, 9, "c")]))
    chunks = await collect(await started(fake), request(logprobs=True))
    assert [c.logprobs for c in chunks[:3]] == [
        (TokenLogprob("t7", -0.1),),
        (TokenLogprob("t8", -0.2),),
        (TokenLogprob("c", -0.3),),
    ]
    assert chunks[-1].logprobs == ()


async def test_no_logprobs_unless_asked() -> None:
    fake = FakeSGLang(script=outputs(["a"], EOS, logprobs=[(-0.1, 7, "a")]))
    chunks = await collect(await started(fake), request())
    assert all(c.logprobs == () for c in chunks) and fake.calls[0]["return_logprob"] is False


async def test_no_part_of_a_stop_string_reaches_the_client() -> None:
    # SGLang streamed the first "\n" of "\n\n", then matched the stop string and trimmed it.
    fake = FakeSGLang(script=outputs(["Hello", "\n", ""], {"type": "stop", "matched": "\n\n"}))
    chunks = await collect(await started(fake), request(stop=("\n\n",)))
    assert text_of(chunks) == "Hello" and chunks[-1].finish_reason == "stop"


async def test_a_stop_string_in_the_stream_ends_the_text() -> None:
    fake = FakeSGLang(script=outputs(["Hi E", "ND more", " text"], LENGTH))
    chunks = await collect(await started(fake), request(stop=("END",)))
    assert text_of(chunks) == "Hi " and chunks[-1].finish_reason == "stop"


async def test_held_back_text_is_sent_when_eos_ends_the_answer() -> None:
    fake = FakeSGLang(script=outputs(["A", "\n"], EOS))
    chunks = await collect(await started(fake), request(stop=("\n\n",)))
    assert text_of(chunks) == "A\n" and chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("finish", "expected"),
    [({"type": "stop", "matched": 2}, "stop"), (LENGTH, "length")],
)
async def test_finish_reasons(finish: dict[str, Any], expected: str) -> None:
    chunks = await collect(await started(FakeSGLang(script=outputs(["x"], finish))), request())
    assert chunks[-1].finish_reason == expected


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ({"type": "abort", "message": "The input (9000 tokens) is longer than the model's context length (4096 tokens).", "status_code": 400}, ContextLengthExceededError),
        ({"type": "abort", "message": "bad regex", "status_code": 400}, InvalidRequestError),
        ({"type": "abort", "message": "server is overloaded", "status_code": 503}, EngineUnavailableError),
        ({"type": "abort", "message": "too many requests", "status_code": 429}, RateLimitedError),
        ({"type": "abort", "message": "internal error", "status_code": 500}, EngineError),
        ({"type": "abort", "message": "paused"}, EngineUnavailableError),  # dropped by the engine: a 503, not a cut answer
        ({"type": "mystery"}, EngineError),
    ],
)
async def test_scheduler_rejections_are_typed_errors(finish: dict[str, Any], expected: type) -> None:
    fake = FakeSGLang(script=outputs([""], finish))
    with pytest.raises(expected):
        await collect(await started(fake), request())
    assert fake.aborted == []


# --- cancellation ------------------------------------------------------------------------


async def test_closing_the_stream_early_aborts_before_closing_sglangs_stream() -> None:
    fake = FakeSGLang(script=outputs(["a", "b"], None), hang=True)
    stream = (await started(fake)).generate(request(rid="abort-me"))
    assert (await anext(stream)).text == "a"
    await stream.aclose()
    rid = fake.calls[0]["rid"]
    assert len(rid) == 32  # our own id, never the client's
    # abort first: once SGLang's stream is closed it forgets the rid and abort is a no-op
    assert fake.events == [("abort", rid), ("closed", rid)]


async def test_cancelling_the_consumer_aborts_the_request_and_reraises() -> None:
    fake = FakeSGLang(script=outputs(["a"], None), hang=True)
    engine = await started(fake)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request()):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.aborted == [fake.calls[0]["rid"]]


async def test_a_finished_request_is_not_aborted_even_if_the_consumer_leaves_at_the_end() -> None:
    fake = FakeSGLang(script=outputs(["a", "b"], EOS))
    stream = (await started(fake)).generate(request())
    async for chunk in stream:
        if chunk.is_final:
            break
    await stream.aclose()
    assert fake.events == []


# --- errors ------------------------------------------------------------------------------

ERRORS = [
    (ValueError("The input (9000 tokens) is longer than the model's context length (4096 tokens)."), ContextLengthExceededError),
    (ValueError("Requested token count exceeds the model's maximum context length of 4096 tokens."), ContextLengthExceededError),
    (ValueError("top_p must be in (0, 1], got 2.0."), InvalidRequestError),
    (HTTPException(503, "The encoder did not return multimodal embeddings."), EngineUnavailableError),
    (RuntimeError("scheduler crashed"), EngineError),
]


@pytest.mark.parametrize(("raised", "expected"), ERRORS)
@pytest.mark.parametrize("where", ["call", "stream-start", "mid-stream"])
async def test_engine_failures_are_typed_errors(raised: Exception, expected: type, where: str) -> None:
    fake = {
        "call": FakeSGLang(on_call=raised),
        "stream-start": FakeSGLang(script=[raised]),
        "mid-stream": FakeSGLang(script=[*outputs(["a"], None), raised]),
    }[where]
    with pytest.raises(expected) as info:
        await collect(await started(fake), request())
    assert info.value.__cause__ is raised
    if expected is EngineError:  # a plain engine failure is not disguised as a 400 or a 503
        assert type(info.value) is EngineError and info.value.retryable
    assert fake.aborted == []


async def test_start_failures_are_typed_and_leave_no_engine() -> None:
    def boom(**_: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    engine = SGLangEngine(CONFIG, engine_factory=boom)
    with pytest.raises(EngineError, match="out of memory"):
        await engine.start()
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()


# --- health and lifecycle ----------------------------------------------------------------


async def test_health_before_start_and_idempotent_shutdown() -> None:
    fake = FakeSGLang()
    engine = SGLangEngine(CONFIG, engine_factory=lambda **_: fake)
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
    with pytest.raises(EngineUnavailableError):
        await collect(engine, request())
    await engine.shutdown()  # before start: nothing to do
    await engine.start()
    await engine.shutdown()
    await engine.shutdown()
    assert fake.shutdowns == 1
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()


# --- the real library (skipped where SGLang is not installed) ----------------------------


def test_real_sglang_api_names() -> None:
    pytest.importorskip("sglang")
    import sglang
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    params = set(inspect.signature(sglang.Engine.async_generate).parameters)
    assert {"input_ids", "sampling_params", "return_logprob", "stream", "rid"} <= params
    assert {"rid"} <= set(inspect.signature(TokenizerManager.abort_request).parameters)
    assert hasattr(sglang.Engine, "shutdown")


# --- merging the streams of n choices -----------------------------------------------------


async def test_merge_streams_interleaves_and_a_failure_closes_the_others_after_abort_all() -> None:
    from deployments.engines.gpu_common import merge_streams

    closed: list[str] = []
    aborted: list[str] = []

    async def stream(name: str, items: int, fail_at: int | None = None) -> AsyncIterator[str]:
        try:
            for i in range(items):
                await asyncio.sleep(0.001 * (1 + (name == "b")))
                if i == fail_at:
                    raise EngineError(f"{name} failed")
                yield f"{name}{i}"
        finally:
            closed.append(name)

    async def abort_all() -> None:
        aborted.append(f"open: {sorted(set('abc') - set(closed))}")

    got = [item async for item in merge_streams([stream("a", 3), stream("b", 2)])]
    assert sorted(got) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]
    assert [i for i, _ in got] != sorted(i for i, _ in got)  # interleaved as they arrive
    closed.clear()
    with pytest.raises(EngineError, match="c failed"):
        async for _ in merge_streams([stream("a", 50), stream("b", 50), stream("c", 50, fail_at=2)], abort_all=abort_all):
            pass
    assert aborted == ["open: ['a', 'b']"] and sorted(closed) == ["a", "b", "c"]
