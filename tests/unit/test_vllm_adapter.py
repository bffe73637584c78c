"""The vLLM adapter against a small in-process fake of ``AsyncLLM`` (no vLLM, no GPU).

The fakes (tests/fakes/vllm_engine.py) mirror vLLM's real names: ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``
attributes, and DELTA outputs (each carries only its new text, token ids and logprobs).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import pytest

from cluster.config import VLLMEngineConfig
from cluster.errors import ContextLengthExceededError, EngineError, EngineUnavailableError, InvalidRequestError
from cluster.protocols import Engine
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob, ToolCall, Usage
from deployments.engines import create_engine
from deployments.engines.vllm import VLLMBackend, VLLMEngine, engine_args_kwargs, sampling_kwargs, token_logprobs
from tests.fakes.vllm_engine import CompletionOutput, Logprob, RequestOutput

# --- fakes with vLLM's attribute names (tests/fakes/vllm_engine.py) -------------------------


def step(text: str, ids: list[int], finish: str | None = None, tokens: list[str] | None = None) -> RequestOutput:
    """One DELTA output; ``tokens`` gives each token's decoded text (and turns logprobs on)."""
    logprobs = None
    if tokens is not None:
        logprobs = [{i: Logprob(-0.5 * (n + 1), 1, tok), 999: Logprob(-9.0, 2, "x")} for n, (i, tok) in enumerate(zip(ids, tokens))]
    completion = CompletionOutput(0, text, ids, None, logprobs, finish_reason=finish)
    return RequestOutput("", None, [1, 2, 3, 4, 5], None, [completion], finished=finish is not None)


class EngineDeadError(Exception):  # the names vLLM uses; the adapter matches on them
    pass


class EngineGenerateError(Exception):
    pass


class VLLMValidationError(ValueError):
    pass


class TemplateError(Exception):
    pass


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
class FakeAsyncLLM:
    """Plays ``script`` for every request (an Exception item is raised there); with ``hang``,
    the stream then waits like a long generation until closed."""

    script: list[Any] = field(default_factory=list)
    hang: bool = False
    health_error: Exception | None = None
    tokenizer: Any = field(default_factory=FakeTokenizer)
    calls: list[tuple[Any, Any, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    shutdowns: int = 0

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt, sampling_params, request_id))
        try:
            for item in self.script:
                await asyncio.sleep(0)
                if isinstance(item, Exception):
                    raise item
                item.request_id = request_id
                yield item
            if self.hang:
                await asyncio.Event().wait()
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early.append(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.health_error is not None:
            raise self.health_error

    def shutdown(self) -> None:
        self.shutdowns += 1

    def get_tokenizer(self) -> Any:
        return self.tokenizer


CONFIG = VLLMEngineConfig(kind="vllm", model="org/tiny")


def engine_on(llm: FakeAsyncLLM, make_params: Callable[[dict[str, Any]], Any] = dict, **kwargs: Any) -> VLLMEngine:
    return VLLMEngine(CONFIG, engine_factory=lambda _: VLLMBackend(llm=llm, make_sampling_params=make_params), **kwargs)


async def started(llm: FakeAsyncLLM, **kwargs: Any) -> VLLMEngine:
    engine = engine_on(llm, **kwargs)
    await engine.start()
    return engine


def request(rid: str = "req-1", **sampling: Any) -> GenerationRequest:
    return GenerationRequest(request_id=rid, messages=(ChatMessage("user", "hi"),), sampling=SamplingParams(**sampling))


async def collect(engine: VLLMEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(req)]


# --- import, construction, config mapping ------------------------------------------------


def test_module_imports_without_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
async def test_start_without_vllm_says_how_to_install() -> None:
    with pytest.raises(EngineUnavailableError, match=r"slm-cluster\[vllm\]"):
        await VLLMEngine(CONFIG).start()


def test_factory_and_protocol() -> None:
    engine = create_engine(CONFIG, system_prompt="Be brief.")
    assert isinstance(engine, VLLMEngine) and isinstance(engine, Engine)
    assert engine.capabilities.streaming and engine.capabilities.logprobs


def test_engine_args_from_config() -> None:
    assert engine_args_kwargs(CONFIG) == {
        "model": "org/tiny",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "enforce_eager": False,
    }
    cfg = VLLMEngineConfig(kind="vllm", model="m", max_model_len=4096, quantization="awq", extra_engine_args={"dtype": "half", "seed": 3})
    args = engine_args_kwargs(cfg)
    assert args["max_model_len"] == 4096 and args["quantization"] == "awq"
    assert args["dtype"] == "half" and args["seed"] == 3  # extra args pass through and win


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (SamplingParams(), {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0}),
        (
            SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, stop=("\n", "END"), seed=42, logprobs=True),
            {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop": ["\n", "END"], "seed": 42, "logprobs": 0},
        ),
        (SamplingParams(logprobs=True, top_logprobs=5), {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "logprobs": 5}),
    ],
)
def test_sampling_params_mapping(ours: SamplingParams, theirs: dict[str, Any]) -> None:
    assert sampling_kwargs(ours) == theirs


# --- request and output mapping ----------------------------------------------------------


async def test_prompt_is_the_chat_template_with_the_system_prompt() -> None:
    llm = FakeAsyncLLM(script=[step("ok", [7], "stop")])
    engine = await started(llm, system_prompt="Be brief.")
    await collect(engine, request(max_tokens=3, stop=("\n",)))
    prompt, params, engine_id = llm.calls[0]
    # "<system>Be brief." / "<user>hi" / "<assistant>": one fake token per piece
    assert prompt == {"prompt_token_ids": [len("system>Be brief."), len("user>hi"), len("assistant>")]}
    assert params == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "stop": ["\n"]}
    assert len(engine_id) == 32 and "req-1" not in engine_id  # our own id, never the client's


async def test_deltas_in_order_then_one_final_chunk_with_usage() -> None:
    llm = FakeAsyncLLM(script=[step("Hel", [1, 2]), step("lo", [3]), step("!", [4], "length")])
    chunks = await collect(await started(llm), request(max_tokens=4))
    assert [c.text for c in chunks] == ["Hel", "lo", "!", ""]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(prompt_tokens=5, completion_tokens=4)  # prompt ids from vLLM's output


async def test_logprobs_one_per_sampled_token_when_asked() -> None:
    script = [step("a b", [1, 2], tokens=["a", " b"]), step("", [3], tokens=["\ufffd"]), step("c", [4], "stop", tokens=["c"])]
    chunks = await collect(await started(FakeAsyncLLM(script=script)), request(logprobs=True))
    assert chunks[0].logprobs == (TokenLogprob("a", -0.5), TokenLogprob(" b", -1.0))
    # a step with a token but no text yet: its logprob rides with the next text
    assert chunks[1].text == "c" and [lp.token for lp in chunks[1].logprobs] == ["\ufffd", "c"]
    assert chunks[-1].usage == Usage(prompt_tokens=5, completion_tokens=4)


def test_logprob_positions_without_the_sampled_token() -> None:
    assert token_logprobs([1, 2], [{}, {999: Logprob(-2.0, 1, "y")}]) == (TokenLogprob("y", -2.0),)


async def test_no_logprobs_unless_asked() -> None:
    llm = FakeAsyncLLM(script=[step("a", [1], "stop", tokens=["a"])])
    chunks = await collect(await started(llm), request())
    assert all(c.logprobs == () for c in chunks)
    assert "logprobs" not in llm.calls[0][1]


@pytest.mark.parametrize(("theirs", "ours"), [("stop", "stop"), ("length", "length"), ("repetition", "stop")])
async def test_finish_reasons(theirs: str, ours: str) -> None:
    chunks = await collect(await started(FakeAsyncLLM(script=[step("x", [1], theirs)])), request())
    assert chunks[-1].finish_reason == ours


async def test_finish_reason_error_is_a_retryable_engine_error() -> None:
    with pytest.raises(EngineError) as info:
        await collect(await started(FakeAsyncLLM(script=[step("x", [1], "error")])), request())
    assert info.value.retryable and not isinstance(info.value, EngineUnavailableError)


# --- cancellation ------------------------------------------------------------------------


async def test_closing_the_stream_early_aborts_the_request() -> None:
    llm = FakeAsyncLLM(script=[step("a", [1]), step("b", [2])], hang=True)
    stream = (await started(llm)).generate(request(rid="abort-me"))
    assert (await anext(stream)).text == "a"
    await stream.aclose()
    engine_id = llm.calls[0][2]
    assert llm.aborted == [engine_id] and len(engine_id) == 32
    assert llm.closed_early == [engine_id]  # and vLLM's own generator was closed


async def test_cancelling_the_consumer_aborts_the_request_and_reraises() -> None:
    llm = FakeAsyncLLM(script=[step("a", [1])], hang=True)
    engine = await started(llm)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request()):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.aborted == [llm.calls[0][2]]


async def test_a_finished_request_is_not_aborted_even_if_the_consumer_leaves_at_the_end() -> None:
    llm = FakeAsyncLLM(script=[step("a", [1]), step("b", [2], "stop")])
    engine = await started(llm)
    await collect(engine, request())
    stream = engine.generate(request(rid="r2"))
    async for chunk in stream:
        if chunk.is_final:
            break
    await stream.aclose()
    assert llm.aborted == [] and llm.closed_early == []


async def test_each_attempt_gets_its_own_engine_id() -> None:
    llm = FakeAsyncLLM(script=[step("a", [1], "stop")])
    engine = await started(llm)
    await collect(engine, request(rid="same"))
    await collect(engine, request(rid="same"))
    assert len({call[2] for call in llm.calls}) == 2


# --- errors ------------------------------------------------------------------------------

ERRORS = [
    (EngineDeadError(), EngineUnavailableError),
    (VLLMValidationError("The decoder prompt (length 9000) is longer than the maximum model length of 4096."), ContextLengthExceededError),
    (ValueError("The decoder prompt (length 9000) is longer than the maximum model length of 4096."), ContextLengthExceededError),
    (VLLMValidationError("top_p must be in (0, 1], got 2.0."), InvalidRequestError),
    (EngineGenerateError(), EngineError),
    (RuntimeError("CUDA error: an illegal memory access"), EngineError),
]


@pytest.mark.parametrize(("raised", "expected"), ERRORS)
@pytest.mark.parametrize("after_chunks", [0, 1])
async def test_engine_failures_are_typed_errors(raised: Exception, expected: type, after_chunks: int) -> None:
    llm = FakeAsyncLLM(script=[step("a", [1])] * after_chunks + [raised])
    with pytest.raises(expected) as info:
        await collect(await started(llm), request())
    assert info.value.__cause__ is raised
    if expected is EngineError:  # a plain engine failure is not disguised as a 400 or a 503
        assert type(info.value) is EngineError and info.value.retryable
    assert llm.aborted == []  # a failed request is not aborted again


async def test_invalid_sampling_options_are_a_400() -> None:
    def reject(kwargs: dict[str, Any]) -> Any:
        raise VLLMValidationError("temperature must be non-negative, got -1.0.")

    with pytest.raises(InvalidRequestError):
        await collect(await started(FakeAsyncLLM(), make_params=reject), request())


async def test_chat_template_errors() -> None:
    class Rejecting(FakeTokenizer):
        def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str:
            raise TemplateError("Conversation roles must alternate user/assistant")

    class Broken(FakeTokenizer):
        def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str:
            raise AttributeError("no chat template")

    with pytest.raises(InvalidRequestError):
        await collect(await started(FakeAsyncLLM(tokenizer=Rejecting())), request())
    with pytest.raises(EngineError):
        await collect(await started(FakeAsyncLLM(tokenizer=Broken())), request())


async def test_start_failures_are_typed_and_leave_no_engine() -> None:
    def boom(_: VLLMEngineConfig) -> VLLMBackend:
        raise RuntimeError("CUDA out of memory")

    engine = VLLMEngine(CONFIG, engine_factory=boom)
    with pytest.raises(EngineError, match="out of memory"):
        await engine.start()
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()


async def test_older_vllm_async_get_tokenizer() -> None:
    class OldLLM(FakeAsyncLLM):
        async def get_tokenizer(self) -> Any:  # type: ignore[override]
            return self.tokenizer

    chunks = await collect(await started(OldLLM(script=[step("ok", [1], "stop")])), request())
    assert chunks[0].text == "ok"


# --- health and lifecycle ----------------------------------------------------------------


async def test_health_and_idempotent_shutdown() -> None:
    llm = FakeAsyncLLM()
    engine = engine_on(llm)
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
    with pytest.raises(EngineUnavailableError):
        await collect(engine, request())
    await engine.shutdown()  # before start: nothing to do
    await engine.start()
    await engine.check_health()
    llm.health_error = EngineDeadError()
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
    await engine.shutdown()
    await engine.shutdown()
    assert llm.shutdowns == 1
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()


# --- the real library (skipped where vLLM is not installed) ------------------------------


def test_real_vllm_api_names() -> None:
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    for name in ("from_engine_args", "generate", "abort", "check_health", "shutdown", "get_tokenizer"):
        assert hasattr(AsyncLLM, name), name
    assert {"prompt", "sampling_params", "request_id"} <= set(inspect.signature(AsyncLLM.generate).parameters)
    assert {"model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager"} <= set(
        inspect.signature(AsyncEngineArgs).parameters
    )
    full = SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9, stop=("x",), seed=1, logprobs=True)
    params = VLLMSamplingParams(**sampling_kwargs(full), output_kind=RequestOutputKind.DELTA)
    assert params.output_kind == RequestOutputKind.DELTA and params.logprobs == 0


# --- n > 1 and tool pieces, on hand-built outputs -------------------------------------------


def _out(*completions: CompletionOutput, finished: bool = False) -> RequestOutput:
    return RequestOutput("x", None, [1, 2, 3], None, list(completions), finished)


def test_n_choices_from_merged_and_partial_delta_outputs() -> None:
    from deployments.engines.vllm import _OutputMapper

    mapper = _OutputMapper(want_logprobs=False, prompt_tokens=0, n=3)
    steps = [
        _out(CompletionOutput(0, " a", [5], None, None), CompletionOutput(2, " x", [6], None, None)),  # choice 1 missing
        _out(CompletionOutput(1, " p q", [7, 8], None, None, "length")),  # two deltas merged by vLLM's collector
        _out(CompletionOutput(0, " b", [9, 0], None, None, "stop"), CompletionOutput(2, "", [0], None, None, "stop"), finished=True),
    ]
    assert [mapper.is_final(s) for s in steps] == [False, False, True]
    chunks = [c for s in steps for c in mapper.feed(s)]
    assert [(c.index, c.text) for c in chunks[:-1]] == [(0, " a"), (2, " x"), (1, " p q"), (0, " b")]
    final = chunks[-1]
    assert final.finish_reasons == ("stop", "length", "stop") and final.finish_reason == "stop"
    assert final.usage == Usage(prompt_tokens=3, completion_tokens=1 + 1 + 2 + 2 + 1)


def test_every_choice_ended_is_final_even_before_finished_is_set() -> None:
    from deployments.engines.vllm import _OutputMapper

    mapper = _OutputMapper(want_logprobs=False, prompt_tokens=0, n=2)
    mapper.feed(_out(CompletionOutput(1, " z", [4], None, None, "stop")))
    last = _out(CompletionOutput(0, " y", [3], None, None, "length"))
    assert mapper.is_final(last)
    assert mapper.feed(last)[-1].finish_reasons == ("length", "stop")


def test_parsed_tool_stream_gives_each_call_one_id_and_one_name() -> None:
    from types import SimpleNamespace as NS

    from deployments.engines.tool_calls import ParsedToolStream

    deltas = iter([
        NS(content="Hi", tool_calls=[]),
        NS(content=None, tool_calls=[NS(index=0, id=None, function=NS(name="f", arguments=None))]),  # no id from the parser
        NS(content=None, tool_calls=[NS(index=0, id=None, function=NS(name="f", arguments='{"a": 1'))]),  # name repeated
        None,  # held back
    ])

    class Parser:
        prev_tool_call_arr = [{"name": "f", "arguments": {"a": 1}}]
        streamed_args_for_tool = ['{"a": 1']

        def extract_tool_calls_streaming(self, *args: Any) -> Any:
            return next(deltas)

    stream = ParsedToolStream(Parser(), request=None)
    got = [stream.feed(t, [i]) for i, t in enumerate(["Hi", " <c>", " f", " x"])]
    assert got[0] == ("Hi", ()) and got[3] == ("", ())
    (first,), (second,) = got[1][1], got[2][1]
    assert first.id and first.id.startswith("call_") and first.name == "f"
    assert (second.id, second.name, second.arguments) == (None, None, '{"a": 1')
    assert stream.called and stream.finish() == ("", (ToolCall(index=0, arguments="}"),))
