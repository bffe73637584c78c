"""/v1/models, /v1/models/{id}, /v1/embeddings and /v1/completions through a real gateway on
Serve, with the official ``openai`` client: fake engines, the trained router's deployment
(its stock embedder), and a ``remote_openai`` frontier pointed at the recording fake
upstream (what reached it is asserted)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import openai
import pytest

from cluster.loader import config_from_dict
from deployments.engines.fake import fake_tokens
from tests.fakes.openai_upstream import OpenAIUpstream
from tests.integration.conftest import ray_local  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

FAKE = {"engine": {"kind": "fake", "default_completion_tokens": 8}, "resources": {"num_cpus": 0.1}}


def _config(upstream_url: str) -> dict:
    return {
        "name": "endpoints",
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "description": "Code help.", "owned_by": "team-code",
             "versions": [{"name": "v1", **FAKE}, {"name": "v2", **FAKE}]},
            {"name": "general", "role": "general", "description": "Everything else.", "versions": [{"name": "v1", **FAKE}]},
            {"name": "frontier", "role": "frontier", "owned_by": "upstream-co", "versions": [{
                "name": "v1", "resources": {"num_cpus": 0.1}, "defaults": {"temperature": 0.3},
                "engine": {"kind": "remote_openai", "base_url": upstream_url, "model": "up-model"}}]},
        ],
        "router": {"resources": {"num_cpus": 0.1}, "torch_threads": 1},
        "gateway": {"resources": {"num_cpus": 0.1}},
        "audit": {"enabled": False},
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[OpenAIUpstream]:
    with OpenAIUpstream(answer="Paris is the capital") as up:
        yield up


@pytest.fixture(scope="module")
def client(ray_local: dict, upstream: OpenAIUpstream) -> Iterator[openai.OpenAI]:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    serve.run(build_from_config(config_from_dict(_config(upstream.base_url))), name="endpoints", route_prefix="/")
    with openai.OpenAI(api_key="unused", base_url=f"{ray_local['base_url']}/v1", max_retries=0, timeout=60) as c:
        yield c


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["auto", "code", "code@v1", "code@v2", "general", "general@v1", "frontier", "frontier@v1", "router-embedder"]
    code = client.models.retrieve("code")
    assert (code.owned_by, code.model_extra["description"], code.model_extra["role"], code.model_extra["domains"]) == (
        "team-code", "Code help.", "specialist", ["code"])
    assert client.models.retrieve("code@v2").model_extra["parent"] == "code"
    assert client.models.retrieve("auto").model_extra["role"] == "router"
    assert client.models.retrieve("router-embedder").model_extra["role"] == "embedding"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("code@v9")
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"


def test_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="router-embedder", input=["How do I sort a list in Python?", "Sorting a Python list",
                                                                   "The court dismissed the appeal."])
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert out.model == "router-embedder" and out.usage.prompt_tokens > 10
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="router-embedder", input=[[1, 2, 3]])
    assert err.value.body["param"] == "input"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="code", input="x")


def test_completions_on_the_fake_engine(client: openai.OpenAI) -> None:
    out = client.completions.create(model="code@v2", prompt="def add(a, b):", max_tokens=4)
    assert out.object == "text_completion" and out.model == "code@v2" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 4 and out.choices[0].text == "".join(fake_tokens("def add(a, b):", 4))  # the raw prompt
    chunks = list(client.completions.create(model="code@v2", prompt="def add(a, b):", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert all(c.object == "text_completion" for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    routed = client.completions.with_raw_response.create(model="auto", prompt="Write a Python function to sort a list", max_tokens=2)
    assert routed.headers["x-slm-route-reason"] and routed.parse().model.split("@")[0] in ("code", "general")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="code", prompt="x", echo=True)
    assert err.value.body["param"] == "echo"


def test_completions_pass_through_to_the_upstream(client: openai.OpenAI, upstream: OpenAIUpstream) -> None:
    out = client.completions.create(model="frontier", prompt="The capital of France is", max_tokens=3, stop=["\n"], logprobs=0)
    assert upstream.paths[-1] == "/v1/completions"
    sent = upstream.last_body
    assert sent["prompt"] == "The capital of France is" and "messages" not in sent and sent["model"] == "up-model"
    assert sent["stream"] is False  # a non-streamed answer is fetched whole (GenerationRequest.whole_answer)
    assert (sent["max_tokens"], sent["stop"], sent["logprobs"], sent["temperature"]) == (3, ["\n"], 0, 0.3)  # the version's default
    assert out.choices[0].text == "Paris is the" and out.choices[0].logprobs.tokens == ["Paris", " is", " the"]
    streamed = list(client.completions.create(model="frontier", prompt="The capital of France is", max_tokens=3, temperature=0.9,
                                              stream=True))
    assert upstream.last_body["temperature"] == 0.9 and upstream.last_body["stream"] is True  # the client's own wins
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "Paris is the"


def test_chat_gets_the_version_defaults_too(client: openai.OpenAI, upstream: OpenAIUpstream) -> None:
    client.chat.completions.create(model="frontier", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert upstream.paths[-1] == "/v1/chat/completions" and upstream.last_body["temperature"] == 0.3
    client.chat.completions.create(model="frontier", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert upstream.last_body["temperature"] == 0
