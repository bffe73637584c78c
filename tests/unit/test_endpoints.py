"""/v1/models, /v1/models/{id}, /v1/embeddings and /v1/completions: the pure shapes and
checks (``cluster.openai_endpoints``), then the real gateway app in process (no Ray), on
fake engines, with the official ``openai`` client over ASGI for the wire shapes."""

from __future__ import annotations

import base64
import json
import struct
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

import httpx
import numpy as np
import openai
import pytest
from ray import serve

from cluster.config import SamplingDefaults
from cluster.errors import ContextLengthExceededError, EngineError, InvalidRequestError, ModelNotFoundError
from cluster.loader import config_from_dict, load_profile
from cluster.openai_endpoints import (
    EMBEDDER_ID,
    RAW_PROMPT_KINDS,
    apply_defaults,
    embedding_body,
    find_model,
    legacy_logprobs,
    model_objects,
    parse_completion_request,
    parse_embedding_request,
    raw_prompt_decision,
    to_completion_request,
)

from cluster.types import GenerationChunk, GenerationRequest, RouteDecision, SamplingParams, TokenLogprob, Usage
from deployments.engines.fake import FakeEngine, fake_tokens
from deployments.engines.remote_openai import RemoteOpenAIEngine, completions_payload
from deployments.gateway import ingress
from deployments.gateway.endpoints import text_sse_events
from tests.unit.test_gateway_edge import KEY, _Method, build_gateway


VLLM = {"engine": {"kind": "vllm", "model": "m", "gpu_memory_utilization": 0.5}, "resources": {"num_gpus": 0.5}}


def _cfg(router: str = "trained", general_kind: str = "fake") -> Any:
    general = {"name": "v1", "engine": {"kind": "fake"}} if general_kind == "fake" else {"name": "v1", **VLLM}
    return config_from_dict({
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "description": "Code help.", "owned_by": "team-code",
             "versions": [{"name": "v1", **VLLM}, {"name": "v2", "engine": {"kind": "fake"}}]},
            {"name": "general", "role": "general", "versions": [general]},
        ],
        "router": {"kind": router},
        "audit": {"enabled": False},
    })


# --- /v1/models --------------------------------------------------------------------------


@pytest.fixture
def vllm_without_raw_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine kind takes raw prompts now; the per-version listing and the fallback are
    for one that does not, played here by vllm."""
    from cluster import openai_endpoints

    monkeypatch.setattr(openai_endpoints, "RAW_PROMPT_KINDS", openai_endpoints.RAW_PROMPT_KINDS - {"vllm"})


def test_model_objects_have_openai_shape_and_our_fields(vllm_without_raw_prompts: None) -> None:
    objects = model_objects(_cfg(), created=7)
    ids = [o["id"] for o in objects]
    assert ids == ["auto", "code", "code@v1", "code@v2", "general", "general@v1", EMBEDDER_ID]
    for o in objects:
        assert o["object"] == "model" and o["created"] == 7 and o["owned_by"] and "description" in o and "role" in o
    code = find_model(objects, "code")
    assert (code["owned_by"], code["description"], code["role"], code["domains"]) == ("team-code", "Code help.", "specialist", ["code"])
    assert code["versions"] == ["v1", "v2"] and code["current_version"] == "v1"
    # v1 is vllm (no raw prompts, by the fixture), v2 the fake (raw prompts): completions is listed per version
    assert find_model(objects, "code@v1")["endpoints"] == ["chat.completions"]
    assert find_model(objects, "code@v2")["endpoints"] == ["chat.completions", "completions"]
    assert find_model(objects, EMBEDDER_ID)["role"] == "embedding"


def test_heuristic_router_lists_no_embedder_and_unknown_ids_are_404() -> None:
    objects = model_objects(_cfg(router="heuristic"), created=0)
    assert EMBEDDER_ID not in [o["id"] for o in objects]
    with pytest.raises(ModelNotFoundError) as err:
        find_model(objects, "code@v9")
    assert err.value.http_status == 404 and err.value.to_openai()["error"]["code"] == "model_not_found"


def test_every_profile_describes_every_model() -> None:
    for name in ("local", "gpu", "sim"):
        cfg = load_profile(name)
        assert all(m.description for m in cfg.models), name


def test_local_profile_samples_cool_by_default() -> None:
    cfg = load_profile("local")
    assert all((v.defaults.temperature, v.defaults.top_p) == (0.2, 0.5) for _, v in cfg.deployments())


# --- sampling defaults -------------------------------------------------------------------


@pytest.mark.parametrize(("unset", "temperature", "top_p"), [
    (frozenset({"temperature", "top_p"}), 0.2, 0.9),
    (frozenset({"temperature"}), 0.2, 0.5),  # the client's top_p stays
    (frozenset(), 1.3, 0.5),  # the client set both
])
def test_defaults_fill_only_what_the_client_left_out(unset: frozenset[str], temperature: float, top_p: float) -> None:
    req = GenerationRequest("r", (), SamplingParams(temperature=1.3, top_p=0.5), unset_sampling=unset)
    out = apply_defaults(req, SamplingDefaults(temperature=0.2, top_p=0.9))
    assert (out.sampling.temperature, out.sampling.top_p) == (temperature, top_p)
    assert apply_defaults(req, SamplingDefaults()) is req


# --- /v1/embeddings ----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": EMBEDDER_ID, "input": [[1, 2, 3]]}, "input", "unsupported_parameter"),
    ({"model": EMBEDDER_ID, "input": [1, 2, 3]}, "input", "unsupported_parameter"),
    ({"model": EMBEDDER_ID, "input": "x", "dimensions": 128}, "dimensions", "unsupported_parameter"),
    ({"model": EMBEDDER_ID, "input": []}, "input", "invalid_request"),
    ({"model": EMBEDDER_ID, "input": ["ok", ""]}, "input", "invalid_request"),
    ({"model": EMBEDDER_ID, "input": ["x"] * 257}, "input", "invalid_request"),
    ({"model": EMBEDDER_ID, "input": "x" * 16_001}, "input", "invalid_request"),
    ({"model": EMBEDDER_ID, "input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_request"),
    ({"model": EMBEDDER_ID, "input": "x", "nope": 1}, "nope", "invalid_request"),
])
def test_embedding_requests_are_bounded(body: dict, param: str, code: str) -> None:
    import json

    with pytest.raises(InvalidRequestError) as err:
        parse_embedding_request(json.dumps(body).encode(), _cfg())
    assert (err.value.param, err.value.code) == (param, code)


def test_embeddings_need_the_trained_router_and_the_embedder_id() -> None:
    with pytest.raises(ModelNotFoundError, match="router.kind: trained"):
        parse_embedding_request(b'{"model": "router-embedder", "input": "x"}', _cfg(router="heuristic"))
    with pytest.raises(ModelNotFoundError):
        parse_embedding_request(b'{"model": "code", "input": "x"}', _cfg())
    job = parse_embedding_request(b'{"model": "router-embedder", "input": "x", "dimensions": 384}', _cfg())
    assert job.texts == ("x",) and job.encoding_format == "float"


def test_embedding_body_float_and_base64() -> None:
    vec = [0.5, -0.25, 1.0]
    floats = embedding_body([vec], prompt_tokens=3, encoding_format="float")
    assert floats["data"] == [{"object": "embedding", "index": 0, "embedding": vec}]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and floats["model"] == EMBEDDER_ID
    b64 = embedding_body([vec], prompt_tokens=3, encoding_format="base64")["data"][0]["embedding"]
    assert list(struct.unpack("<3f", base64.b64decode(b64))) == vec
    assert np.frombuffer(base64.b64decode(b64), dtype="float32").tolist() == vec  # how the openai SDK decodes it


# --- /v1/completions ---------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "  "}, "prompt"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_completion_refusals_name_the_parameter(extra: dict, param: str) -> None:
    import json

    gw = _cfg().gateway
    with pytest.raises(InvalidRequestError) as err:
        to_completion_request(parse_completion_request(json.dumps({"model": "code", "prompt": "hi", **extra}).encode()), gw, "r")
    assert err.value.param == param and err.value.http_status == 400


def test_completion_request_maps_to_a_raw_prompt() -> None:
    gw = _cfg().gateway
    wire = parse_completion_request(b'{"model": "code", "prompt": ["Once"], "top_p": 0.5, "stop": "x", "logprobs": 0, "max_tokens": 5}')
    gen = to_completion_request(wire, gw, "r1")
    assert gen.prompt == "Once" and gen.messages == () and gen.unset_sampling == frozenset({"temperature"})
    assert (gen.sampling.max_tokens, gen.sampling.top_p, gen.sampling.stop, gen.sampling.logprobs) == (5, 0.5, ("x",), True)
    with pytest.raises(ContextLengthExceededError):
        to_completion_request(parse_completion_request(b'{"model": "code", "prompt": "' + b"x" * 40_000 + b'"}'), gw, "r")


def test_raw_prompt_routing(vllm_without_raw_prompts: None) -> None:
    cfg = _cfg()
    pinned = RouteDecision("code", "v1", "pinned")  # vllm: no raw prompts, by the fixture
    with pytest.raises(InvalidRequestError) as err:
        raw_prompt_decision(cfg, pinned, auto=False)
    assert err.value.param == "model" and err.value.code == "model_not_supported"
    assert raw_prompt_decision(cfg, RouteDecision("code", "v2", "pinned"), auto=False).version == "v2"
    routed = raw_prompt_decision(cfg, RouteDecision("code", "v1", "domain:code", domain="code"), auto=True)
    assert (routed.model, routed.reason, routed.domain) == ("general", "general:raw-prompt", "code")
    with pytest.raises(InvalidRequestError):  # auto, but the general model cannot either
        raw_prompt_decision(_cfg(general_kind="vllm"), RouteDecision("code", "v1", "domain:code"), auto=True)


def test_the_kind_table_matches_the_adapters() -> None:
    from deployments.engines.hf import HFEngine
    from deployments.engines.sglang import SGLangEngine
    from deployments.engines.vllm import VLLMEngine

    adapters = {"fake": FakeEngine, "hf": HFEngine, "remote_openai": RemoteOpenAIEngine, "vllm": VLLMEngine, "sglang": SGLangEngine}
    assert {k for k, a in adapters.items() if a.capabilities.raw_prompt} == RAW_PROMPT_KINDS


def test_legacy_logprobs_and_upstream_payload() -> None:
    lps = legacy_logprobs([TokenLogprob("He", -0.1), TokenLogprob("llo", -0.2)])
    assert lps == {"tokens": ["He", "llo"], "token_logprobs": [-0.1, -0.2], "top_logprobs": None, "text_offset": [0, 2]}
    req = GenerationRequest("r", (), SamplingParams(max_tokens=3, stop=("\n",), seed=4, logprobs=True), prompt="Once")
    body = completions_payload("up", req)
    assert body["prompt"] == "Once" and "messages" not in body and body["logprobs"] == 0 and body["stop"] == ["\n"]


# --- the legacy stream's events (the shared loop: responses.sse_stream) -----------------

META = {"id": "cmpl-x", "created": 1, "model": "general@v1"}


async def _text_events(*items: GenerationChunk | Exception, include_usage: bool,
                       trailer: Callable[[], dict[str, str]] | None = None) -> tuple[list[str], list[bool]]:
    """Every event ``text_sse_events`` sends for ``items`` (an exception is raised in place),
    and whether it closed the chunk stream."""
    closed: list[bool] = []

    async def chunks() -> AsyncIterator[GenerationChunk]:
        try:
            for item in items:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            closed.append(True)

    stream = chunks()
    first = await stream.__anext__()
    raw = [e async for e in text_sse_events(first, stream, META, include_usage=include_usage, logprobs=False, trailer=trailer)]
    return raw, closed


async def test_text_stream_sends_usage_then_the_trailer_then_done() -> None:
    raw, closed = await _text_events(GenerationChunk(text="Hi"), GenerationChunk(text="!", finish_reason="stop", usage=Usage(2, 2)),
                                     include_usage=True, trailer=lambda: {"x-slm-cost-usd": "0.1"})
    assert raw[-2:] == [': x-slm-trailer {"x-slm-cost-usd":"0.1"}\n\n', "data: [DONE]\n\n"] and closed == [True]
    events = [json.loads(e.removeprefix("data: ")) for e in raw[:-2]]
    assert [(c["text"], c["finish_reason"]) for e in events[:-1] for c in e["choices"]] == [("Hi", None), ("!", None), ("", "stop")]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    quiet, _ = await _text_events(GenerationChunk(text="Hi", finish_reason="stop", usage=Usage(2, 1)), include_usage=False)
    assert all("usage" not in json.loads(e.removeprefix("data: ")) for e in quiet[:-1]) and quiet[-1] == "data: [DONE]\n\n"


async def test_text_stream_failing_midway_ends_with_an_error_event_and_closes_the_chunks() -> None:
    raw, closed = await _text_events(GenerationChunk(text="Hi"), EngineError("the replica fell over"), include_usage=True,
                                     trailer=lambda: {"x-slm-cost-usd": "0"})
    assert json.loads(raw[0].removeprefix("data: "))["choices"][0]["text"] == "Hi"
    assert json.loads(raw[-1].removeprefix("data: ")) == EngineError("the replica fell over").to_openai()
    assert len(raw) == 2 and closed == [True]  # no finish, usage, trailer nor [DONE] after the error


# --- the gateway app in process, through the official client ---------------------------


class _EmbedRouter:
    """The router deployment's ``embed`` over the real stock embedder (no Ray)."""

    def __init__(self) -> None:
        from router_models.embedder import Embedder

        embedder = Embedder(max_tokens=256, head_tokens=None, context_tokens=0, dtype="float32", threads=1).load()

        async def embed(texts: list[str]) -> dict[str, Any]:
            return {"embeddings": embedder.embed(texts), "prompt_tokens": sum(map(len, embedder.token_ids(texts)))}

        async def route(_: Any) -> Any:
            raise RuntimeError("no routing in this test")

        self.embed, self.route = _Method(embed), _Method(route)


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[openai.AsyncOpenAI]:
    gw, _ = await build_gateway(monkeypatch)
    gw.router = _EmbedRouter()
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=gw, app_name=""))
    transport = httpx.ASGITransport(app=ingress.api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw/v1") as http:
        yield openai.AsyncOpenAI(api_key=KEY, base_url="http://gw/v1", http_client=http, max_retries=0)


async def test_models_through_the_client(client: openai.AsyncOpenAI) -> None:
    listed = await client.models.list()
    assert [m.id for m in listed.data][:2] == ["auto", "general"] and listed.data[-1].id == EMBEDDER_ID
    one = await client.models.retrieve("general@v1")
    assert one.object == "model" and one.owned_by == "slm-cluster" and one.model_extra["role"] == "general"
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"


async def test_embeddings_through_the_client(client: openai.AsyncOpenAI) -> None:
    out = await client.embeddings.create(model=EMBEDDER_ID, input=["The cat sits on the mat.", "A cat is sitting on a mat.",
                                                                   "Stock markets fell sharply today."])
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape == (3, 384) and [d.index for d in out.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    assert vecs[0] @ vecs[1] > 0.9 > 0.2 > vecs[0] @ vecs[2]  # the stock model's geometry
    assert out.usage.prompt_tokens == out.usage.total_tokens > 10
    # Told no format, the SDK asks for base64 and decodes it (the call above); told base64,
    # it hands the string over as is.
    b64 = await client.embeddings.create(model=EMBEDDER_ID, input="The cat sits on the mat.", encoding_format="base64")
    assert np.allclose(np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4"), vecs[0], atol=1e-6)
    floats = await client.embeddings.create(model=EMBEDDER_ID, input="The cat sits on the mat.", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vecs[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model=EMBEDDER_ID, input="x", dimensions=64)
    assert err.value.body["param"] == "dimensions"


async def test_completions_through_the_client(client: openai.AsyncOpenAI) -> None:
    out = await client.completions.create(model="general", prompt="Once upon a time", max_tokens=3, logprobs=0)
    assert out.object == "text_completion" and out.model == "general@v1"
    assert out.choices[0].text == "".join(fake_tokens("Once upon a time", 3))  # the raw prompt, no roles, no system prompt
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert len(out.choices[0].logprobs.tokens) == 3 and "".join(out.choices[0].logprobs.tokens) == out.choices[0].text
    streamed = [c async for c in await client.completions.create(model="general", prompt="Once upon a time", max_tokens=3,
                                                                  stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text  # the fake is deterministic
    assert streamed[-2].choices[0].finish_reason == "length" and streamed[-1].usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="general", prompt="x", suffix="y")
    assert err.value.body["param"] == "suffix"


# --- the real SmolLM2 (the local profile's model), loaded once with the hf tests --------


async def test_hf_takes_a_raw_prompt_and_the_local_defaults_answer_paris() -> None:
    from cluster.types import ChatMessage
    from deployments.engines.hf import HFEngine
    from tests.contract.factories.hf import require_model, shared_loader

    require_model()
    version = load_profile("local").general.current
    engine = HFEngine(version.engine, system_prompt=version.system_prompt, loader=shared_loader)
    await engine.start()
    try:
        raw = GenerationRequest("raw", (), SamplingParams(max_tokens=3), prompt="The capital of France is")
        tokenizer = engine._require_loaded().tokenizer
        assert engine.encode(raw) == tokenizer.encode("The capital of France is")  # no chat template, no system prompt
        final = [c async for c in engine.generate(raw)][-1]
        assert final.usage is not None and final.usage.prompt_tokens == len(tokenizer.encode("The capital of France is"))
        # A chat request that sets no sampling, as the gateway sends it (OpenAI's 1.0s, marked
        # unset), with the version's defaults applied as the ModelServer does. At 1.0 this
        # model starts in French on about half the seeds (docs/endpoints.md).
        for seed in range(3):
            request = GenerationRequest(f"s{seed}", (ChatMessage("user", "What is the capital of France?"),),
                                        SamplingParams(max_tokens=12, temperature=1.0, top_p=1.0, seed=seed),
                                        unset_sampling=frozenset({"temperature", "top_p"}))
            text = "".join([c.text async for c in engine.generate(apply_defaults(request, version.defaults))])
            assert "Paris" in text, (seed, text)
    finally:
        await engine.shutdown()
