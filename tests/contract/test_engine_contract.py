"""One suite for every engine adapter that runs here (see ``factories/``).

Adapters that need a library this machine lacks skip cleanly through their factory.
"""

from __future__ import annotations

import asyncio
import importlib

import pytest

from cluster.errors import EngineUnavailableError, SLMError
from cluster.protocols import Engine
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from tests.contract.harness import EngineUnderTest

ADAPTERS = ["fake", "hf", "remote_openai", "vllm", "sglang"]


def _request(max_tokens: int = 8, logprobs: bool = False, rid: str = "r1") -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        messages=(ChatMessage("user", "Name three prime numbers."),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs),
    )


@pytest.fixture(params=ADAPTERS)
async def eut(request: pytest.FixtureRequest) -> EngineUnderTest:
    try:
        factory = importlib.import_module(f"tests.contract.factories.{request.param}")
    except ModuleNotFoundError as err:
        pytest.skip(f"no factory for {request.param}: {err}")
    made = await factory.make()
    yield made
    await made.close()


async def test_is_an_engine(eut: EngineUnderTest) -> None:
    assert isinstance(eut.engine, Engine)


async def test_text_chunks_then_one_final_chunk_with_usage(eut: EngineUnderTest) -> None:
    chunks = [c async for c in eut.engine.generate(_request(max_tokens=8))]
    assert chunks, "no chunks"
    *body, final = chunks
    assert all(c.finish_reason is None and c.usage is None for c in body)
    assert final.finish_reason in ("stop", "length")
    assert final.usage is not None
    assert final.usage.prompt_tokens > 0
    assert 1 <= final.usage.completion_tokens <= 8
    assert "".join(c.text for c in chunks).strip(), "empty answer"


async def test_max_tokens_cuts_with_length(eut: EngineUnderTest) -> None:
    chunks = [c async for c in eut.engine.generate(_request(max_tokens=2))]
    assert chunks[-1].usage.completion_tokens <= 2
    assert chunks[-1].finish_reason == "length"


async def test_logprobs_when_capable(eut: EngineUnderTest) -> None:
    if not eut.engine.capabilities.logprobs:
        pytest.skip("adapter does not report logprobs")
    chunks = [c async for c in eut.engine.generate(_request(max_tokens=4, logprobs=True))]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert logprobs and all(lp.logprob <= 0.0 for lp in logprobs)


async def test_closing_the_stream_aborts_the_generation(eut: EngineUnderTest) -> None:
    before = eut.aborted()
    stream = eut.engine.generate(_request(max_tokens=eut.long_max_tokens, rid="abort-me"))
    got = 0
    async for chunk in stream:
        got += 1
        if got == 2:
            break
    await stream.aclose()
    for _ in range(100):  # an upstream may see the disconnect a moment later
        if eut.aborted() > before:
            break
        await asyncio.sleep(0.05)
    assert eut.aborted() == before + 1
    # and the engine still serves afterwards
    chunks = [c async for c in eut.engine.generate(_request(max_tokens=3, rid="after"))]
    assert chunks[-1].usage is not None


async def test_concurrent_streams_are_independent(eut: EngineUnderTest) -> None:
    async def run(i: int) -> str:
        chunks = [c async for c in eut.engine.generate(_request(max_tokens=6, rid=f"c{i}"))]
        assert chunks[-1].usage is not None
        return "".join(c.text for c in chunks)

    answers = await asyncio.gather(*(run(i) for i in range(4)))
    # temperature 0 and one prompt: the answers agree whether batched or not
    assert len(set(answers)) == 1


async def test_failures_are_typed_errors(eut: EngineUnderTest) -> None:
    with pytest.raises(SLMError) as info:
        async for _ in eut.broken.generate(_request()):
            pass
    assert type(info.value) is eut.broken_error
    assert info.value.http_status == eut.broken_status


async def test_health(eut: EngineUnderTest) -> None:
    await eut.engine.check_health()
    await eut.engine.shutdown()
    with pytest.raises(EngineUnavailableError):
        await eut.engine.check_health()


# One request per optional OpenAI parameter (cluster/capabilities.py FEATURES).
_OPTIONAL = {
    "tools": {"tools": ({"type": "function", "function": {"name": "f"}},)},
    "tool_choice": {"tools": ({"type": "function", "function": {"name": "f"}},), "tool_choice": "required"},
    "response_format": {"response_format": {"type": "json_object"}},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": ((1, -1.0),)},
    "stop": {"stop": ("\n",)},
    "top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "n": {"n": 2},
}


async def test_refuses_optional_parameters_it_does_not_declare(eut: EngineUnderTest) -> None:
    from cluster.capabilities import FEATURES
    from cluster.errors import InvalidRequestError

    assert set(_OPTIONAL) == set(FEATURES)
    refused = [name for name in FEATURES if name not in eut.engine.capabilities.params]
    for name in refused:
        if name == "tool_choice" and "tools" in refused:
            continue  # tools is named first
        request = GenerationRequest("opt", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=2, **_OPTIONAL[name]))
        with pytest.raises(InvalidRequestError) as info:
            async for _ in eut.engine.generate(request):
                pass
        assert (info.value.param, info.value.code, info.value.http_status) == (name, "unsupported_parameter", 400)
