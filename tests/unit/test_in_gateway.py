"""Versions that run in the gateway (``runs_in: gateway``): the config rules, the pumped
stream that stands in for a Serve streaming call, and a real remote_openai engine against
the fake upstream on loopback, pulled by the gateway's own ``timed_chunks``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator, Iterator

import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig, GatewayConfig, ModelVersionConfig
from cluster.errors import EngineError, EngineTimeoutError, EngineUnavailableError
from cluster.loader import load_profile
from cluster.serve_config import data_plane_deployments
from cluster.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from deployments.gateway.streams import timed_chunks
from deployments.in_gateway import InGatewayModel, in_gateway_models
from deployments.stream_batching import DirectStream
from tests.fakes.openai_upstream import OpenAIUpstream


def _remote(base_url: str = "http://127.0.0.1:9/v1", **fields: Any) -> ModelVersionConfig:
    engine = {"kind": "remote_openai", "base_url": base_url, "model": "frontier-x", "read_timeout_s": 2.0}
    return ModelVersionConfig.model_validate({"name": "v1", "engine": engine, "runs_in": "gateway", **fields})


def _request(max_tokens: int = 16, unset: frozenset[str] = frozenset()) -> GenerationRequest:
    return GenerationRequest(request_id="req-1", messages=(ChatMessage("user", "What is two plus two?"),),
                             sampling=SamplingParams(max_tokens=max_tokens), unset_sampling=unset)


# --- config -----------------------------------------------------------------------------


def test_only_a_remote_engine_may_run_in_the_gateway() -> None:
    with pytest.raises(ValidationError, match="remote_openai engines only"):
        ModelVersionConfig.model_validate({"name": "v1", "engine": {"kind": "fake"}, "runs_in": "gateway"})
    with pytest.raises(ValidationError, match="no GPUs"):
        _remote(resources={"num_gpus": 0.5})
    with pytest.raises(ValidationError, match="scale to zero"):
        _remote(autoscaling={"min_replicas": 0})
    assert _remote().runs_in == "gateway"


def test_a_version_in_the_gateway_is_no_deployment() -> None:
    data = load_profile("sim").model_dump(mode="json")
    frontier = next(m for m in data["models"] if m["role"] == "frontier")
    frontier["versions"][0] = _remote().model_dump(mode="json")
    cfg = ClusterConfig.model_validate(data)
    name = f"{frontier['name']}-v1"
    assert name not in cfg.deployment_names()
    assert name not in [d["name"] for d in data_plane_deployments(cfg)]
    assert len(cfg.model_deployments()) == len(cfg.deployments()) - 1
    assert list(in_gateway_models(cfg)) == [name]


# --- the direct stream ------------------------------------------------------------------


def _chunk(text: str, final: bool = False) -> GenerationChunk:
    return GenerationChunk(text=text, finish_reason="stop" if final else None)


async def test_direct_stream_hands_out_each_chunk_and_closes_the_engine_after_the_final_one() -> None:
    closed = asyncio.Event()

    async def three() -> AsyncIterator[GenerationChunk]:
        try:
            yield _chunk("a")
            yield _chunk("b")
            yield _chunk("c", final=True)
            yield _chunk("never pulled")
        finally:
            closed.set()

    stream = DirectStream(three())
    assert [c.text for c in await stream.__anext__()] == ["a"]
    assert [c.text for c in await stream.__anext__()] == ["b"]
    assert not closed.is_set()
    assert [c.text for c in await stream.__anext__()] == ["c"]
    assert closed.is_set()  # the engine's cleanup (slot, upstream response) ran with the final chunk
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_direct_stream_raises_the_engines_error_after_its_chunks() -> None:
    async def fails() -> AsyncIterator[GenerationChunk]:
        yield _chunk("a")
        raise EngineError("upstream broke")

    stream = DirectStream(fails())
    assert [c.text for c in await stream.__anext__()] == ["a"]
    with pytest.raises(EngineError, match="upstream broke"):
        await stream.__anext__()
    stream.cancel()  # an ended stream: nothing to close, no error


async def test_cancelling_a_direct_stream_closes_the_engines_stream() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[GenerationChunk]:
        try:
            while True:
                yield _chunk("x")
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    stream = DirectStream(endless())
    assert await stream.__anext__()
    stream.cancel()
    await asyncio.wait_for(closed.wait(), 1.0)


async def test_a_pull_cut_by_its_deadline_ends_the_engines_stream_in_place() -> None:
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[GenerationChunk]:
        try:
            yield _chunk("a")
            await asyncio.sleep(10)
            yield _chunk("b", final=True)
        finally:
            closed.set()

    gw = GatewayConfig(first_token_timeout_s=1.0, stream_idle_timeout_s=0.05, request_timeout_s=5.0)
    chunks = timed_chunks(lambda: DirectStream(slow()), gw, asyncio.get_running_loop().time)
    assert (await chunks.__anext__()).text == "a"
    with pytest.raises(EngineTimeoutError):
        await chunks.__anext__()
    assert closed.is_set()  # the timeout's cancellation went through the engine's generator


# --- a real remote engine, pulled as the gateway pulls it -------------------------------


@pytest.fixture
def upstream() -> Iterator[OpenAIUpstream]:
    with OpenAIUpstream(answer="two plus two is four") as up:
        yield up


async def _answer(model: InGatewayModel, request: GenerationRequest) -> list[GenerationChunk]:
    chunks = timed_chunks(lambda: model.stream(request), GatewayConfig(), asyncio.get_running_loop().time)
    return [c async for c in chunks]


async def test_the_answer_comes_straight_from_the_upstream_with_the_versions_defaults(upstream: OpenAIUpstream) -> None:
    model = InGatewayModel("frontier", _remote(upstream.base_url, defaults={"temperature": 0.3}))
    try:
        chunks = await _answer(model, _request(unset=frozenset({"temperature"})))
    finally:
        await model.shutdown()
    assert "".join(c.text for c in chunks) == "two plus two is four"
    assert chunks[-1].is_final and chunks[-1].usage is not None
    assert upstream.last_body is not None and upstream.last_body["temperature"] == 0.3  # left out by the client: the default


async def test_a_call_the_gateway_drops_aborts_the_upstream_request(upstream: OpenAIUpstream) -> None:
    upstream.knobs.token_delay_s = 0.1
    model = InGatewayModel("frontier", _remote(upstream.base_url))
    try:
        chunks = timed_chunks(lambda: model.stream(_request()), GatewayConfig(), asyncio.get_running_loop().time)
        first = await chunks.__anext__()
        assert first.text
        await chunks.aclose()  # what a client that leaves, or a race's loser, does
        for _ in range(100):
            if upstream.disconnected:
                break
            await asyncio.sleep(0.02)
        assert upstream.disconnected == 1 and upstream.completed == 0
    finally:
        await model.shutdown()


async def test_calls_past_the_versions_limits_get_a_503(upstream: OpenAIUpstream) -> None:
    upstream.knobs.first_byte_delay_s = 0.3
    model = InGatewayModel("frontier", _remote(upstream.base_url, max_ongoing_requests=1, max_queued_requests=1))
    try:
        results = await asyncio.gather(*(_answer(model, _request()) for _ in range(3)), return_exceptions=True)
    finally:
        await model.shutdown()
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], EngineUnavailableError)
    assert refused[0].code == "model_at_capacity" and refused[0].http_status == 503
    assert upstream.completed == 2  # one ran, one queued behind it and then ran


async def test_a_whole_answer_waits_past_the_first_token_limit_but_not_past_the_requests(upstream: OpenAIUpstream) -> None:
    upstream.knobs.first_byte_delay_s = 0.4  # the whole answer arrives after 0.4 s
    gw = GatewayConfig(first_token_timeout_s=0.2, request_timeout_s=5)
    model = InGatewayModel("frontier", _remote(upstream.base_url))
    clock = asyncio.get_running_loop().time
    try:
        with pytest.raises(EngineTimeoutError):  # streamed: no first token within 0.2 s
            _ = [c async for c in timed_chunks(lambda: model.stream(_request()), gw, clock)]
        whole = dataclasses.replace(_request(), whole_answer=True)
        chunks = [c async for c in timed_chunks(lambda: model.stream(whole), gw, clock, whole=True)]
        assert "".join(c.text for c in chunks) == "two plus two is four" and upstream.last_body["stream"] is False
        with pytest.raises(EngineTimeoutError):  # but the request's own limit still holds
            _ = [c async for c in timed_chunks(lambda: model.stream(whole), GatewayConfig(first_token_timeout_s=0.2, request_timeout_s=0.3),
                                               clock, whole=True)]
    finally:
        await model.shutdown()
