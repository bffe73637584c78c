"""Hostile and malformed input against the real gateway app, in process (no Ray): every
answer is an OpenAI body with a 4xx status, never a 500 and never a hang (issue 12).

The FastAPI app of ``deployments.gateway.ingress`` is driven through ASGI; its routes'
``self`` (Serve's class-based-view dependency) is overridden with a Gateway built on fake
handles around ``FakeEngine``.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from cluster.errors import InvalidRequestError
from cluster.loader import config_from_dict
from cluster.openai_schema import ChatCompletionRequest, parse_chat_request
from cluster.types import GenerationChunk, GenerationRequest, Usage
from deployments.engines.fake import FakeEngine
from deployments.gateway import ingress, metrics
from deployments.gateway.edge import clean_request_id, key_matches
from deployments.gateway.responses import collect_completion

KEY = "sk-test"


def _fake(name: str) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 4, "tokens_per_s": 2000, "ttft_ms": 1}}


def make_config(**gateway: Any):  # type: ignore[no-untyped-def]
    return config_from_dict(
        {
            "models": [
                {"name": "general", "role": "general", "versions": [_fake("v1")]},
                {"name": "frontier", "role": "frontier", "versions": [_fake("v1")]},
            ],
            "audit": {"enabled": False},
            "gateway": {"api_keys_env": "SLM_TEST_KEYS", "body_timeout_s": 0.3, **gateway},
        }
    )


class _Call:
    """What ``handle.options(stream=True).generate.remote(req)`` gives: batches, cancel()."""

    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self._it = engine.generate(request)

    def __aiter__(self) -> "_Call":
        return self

    async def __anext__(self) -> list[GenerationChunk]:
        return [await self._it.__anext__()]

    def cancel(self) -> None:
        asyncio.ensure_future(self._it.aclose())


class _Method:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeHandle:
    def __init__(self, engine: FakeEngine, seen: list[GenerationRequest]) -> None:
        self.seen = seen
        self.ready_hangs = False

        def generate(request: GenerationRequest) -> _Call:
            seen.append(request)
            return _Call(engine, request)

        async def ready() -> dict[str, Any]:
            if self.ready_hangs:
                await asyncio.sleep(3600)
            return {"gpu_ids": []}

        self.generate = _Method(generate)
        self.ready = _Method(ready)

    def options(self, **_: Any) -> "FakeHandle":
        return self


class DeadRouter:
    def __init__(self) -> None:
        async def route(_: Any) -> Any:
            raise RuntimeError("no router in this test")

        self.route = _Method(route)


class _Noop:
    def __getattr__(self, _: str) -> Any:
        return lambda *a, **k: None


def _gateway_class() -> Any:
    return next(c for c in ingress.Gateway.__mro__ if "_check_auth" in c.__dict__)  # the class under Serve's wrapper


async def build_gateway(monkeypatch: pytest.MonkeyPatch, **gateway: Any) -> tuple[Any, list[GenerationRequest]]:
    monkeypatch.setattr(metrics, "make", lambda spec: _Noop())
    cfg = make_config(**gateway)
    seen: list[GenerationRequest] = []
    handles = {}
    for model, version in cfg.deployments():
        engine = FakeEngine(version.engine)
        await engine.start()
        handles[f"{model.name}-{version.name}"] = FakeHandle(engine, seen)
    gw = _gateway_class()(cfg, DeadRouter(), handles, env={"SLM_TEST_KEYS": KEY})

    async def counts() -> dict[str, int]:
        return {name: 1 for name in handles}

    gw.replica_counts = counts
    return gw, seen


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, list[GenerationRequest], httpx.AsyncClient]]:
    gw, seen = await build_gateway(monkeypatch)
    # Serve made each route's ``self`` a dependency reading the replica context's servable.
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=gw, app_name=""))
    transport = httpx.ASGITransport(app=ingress.api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers={"authorization": f"Bearer {KEY}"}) as client:
        yield gw, seen, client


CHAT = {"model": "general", "messages": [{"role": "user", "content": "hi"}]}


def _error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and {"message", "type", "param", "code"} <= set(err)
    return err


async def test_a_plain_request_is_answered(gateway: Any) -> None:
    _, _, client = gateway
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"


async def test_deeply_nested_json_is_invalid_json_not_a_recursion_error(gateway: Any) -> None:
    _, _, client = gateway
    for body in ("[" * 200_000, '{"a":' * 100_000, json.dumps({**CHAT, "user": None})[:-1] + "[" * 50_000):
        _error(await client.post("/v1/chat/completions", content=body), 400, "invalid_json")


@pytest.mark.parametrize("bad", ["x" * 129, "a b", "X-1;drop", "\u00e9t\u00e9", ""])
async def test_an_unsafe_request_id_is_replaced_by_a_fresh_one(gateway: Any, bad: str) -> None:
    _, seen, client = gateway
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=[(b"x-request-id", bad.encode("utf-8"))])
    assert resp.status_code == 200
    fresh = resp.json()["id"].removeprefix("chatcmpl-")
    assert len(fresh) == 32 and (not bad or bad not in fresh)
    assert all(bad not in r.request_id or not bad for r in seen)


async def test_a_safe_request_id_names_the_answer_and_never_prefixes_another(gateway: Any) -> None:
    _, seen, client = gateway
    for rid in ("X-1", "X-10"):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": rid})
        assert resp.json()["id"] == f"chatcmpl-{rid}"
    assert len({r.request_id for r in seen}) == 2
    assert clean_request_id("a" * 128) == "a" * 128 and clean_request_id("a" * 129) != "a" * 129


@pytest.mark.parametrize("token", ["Bearer \u043a\u043b\u044e\u0447", "Bearer sk-t\u00e9st", "Bearer \u00ff"])
async def test_a_non_ascii_api_key_is_a_401(gateway: Any, token: str) -> None:
    _, _, client = gateway
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=[(b"authorization", token.encode("utf-8"))])
    _error(resp, 401, "invalid_api_key")
    _error(await client.get("/v1/models", headers=[(b"authorization", token.encode("utf-8"))]), 401, "invalid_api_key")
    assert key_matches(KEY, [KEY]) and not key_matches("\udcff", [KEY])


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**40])
async def test_a_seed_outside_int64_is_a_400_naming_seed(gateway: Any, seed: int) -> None:
    _, _, client = gateway
    err = _error(await client.post("/v1/chat/completions", json={**CHAT, "seed": seed}), 400, "invalid_request")
    assert err["param"] == "seed"
    ok = await client.post("/v1/chat/completions", json={**CHAT, "seed": 2**63 - 1})
    assert ok.status_code == 200


async def test_a_slow_upload_gets_a_408_within_the_body_deadline(gateway: Any) -> None:
    _, _, client = gateway

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"model": "general",'
        await asyncio.sleep(30)
        yield b"}"

    resp = await asyncio.wait_for(client.post("/v1/chat/completions", content=trickle()), 5)
    _error(resp, 408, "request_timeout")


async def test_readyz_reads_replica_counts_not_the_request_queues(gateway: Any) -> None:
    gw, _, client = gateway
    for handle in gw.models.values():
        handle.ready_hangs = True  # every replica's queue is full
    resp = await asyncio.wait_for(client.get("/readyz"), 5)
    assert resp.status_code == 200 and resp.json()["ready"] is True

    async def one_missing() -> dict[str, int]:
        return {"general-v1": 1}

    gw.replica_counts = one_missing
    assert (await client.get("/readyz")).status_code == 503

    async def broken() -> dict[str, int]:
        raise ConnectionError("controller gone")

    gw.replica_counts = broken
    resp = await client.get("/readyz")
    assert resp.status_code == 503 and resp.json()["ready"] is False


async def test_any_route_failure_is_an_openai_body(gateway: Any) -> None:
    gw, _, client = gateway
    config = gw.config
    gw.config = None  # a bug of ours inside /v1/models
    _error(await client.get("/v1/models"), 500, "internal_error")
    gw.config = config

    gw.warmth = None  # /readyz touches it first
    _error(await client.get("/readyz"), 500, "internal_error")
    _error(await client.get("/nope"), 404, "not_found")
    _error(await client.delete("/v1/models"), 405, "not_found")


async def test_the_answer_iterator_is_closed_explicitly() -> None:
    closed: list[bool] = []

    class Chunks:
        def __aiter__(self) -> "Chunks":
            return self

        async def __anext__(self) -> GenerationChunk:
            return GenerationChunk(text="a", finish_reason="stop", usage=Usage(1, 1))

        async def aclose(self) -> None:
            closed.append(True)

    meta = {"id": "chatcmpl-x", "created": 0, "model": "m"}
    await collect_completion(Chunks(), meta, logprobs=False)
    assert closed == [True]


async def test_the_openapi_schema_describes_the_endpoints(gateway: Any) -> None:
    _, _, client = gateway
    doc = (await client.get("/openapi.json")).json()
    assert {"/v1/chat/completions", "/v1/models", "/readyz", "/healthz"} <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(schema["required"]) and schema["additionalProperties"] is False
    assert schema["properties"]["seed"]["anyOf"][0]["maximum"] >= 2**63 - 1
    assert {"400", "401", "408", "413", "500"} <= set(chat["responses"])
    assert "$defs" not in json.dumps(schema)


# --- the request parser, property-tested ----------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_fields = st.fixed_dictionaries(
    {
        "model": st.text(max_size=8),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]), "content": _json}), max_size=3
        ),
    },
    optional={k: _json for k in ("seed", "stream", "max_tokens", "temperature", "top_p", "stop", "n", "stream_options", "x")},
)


def _parses_or_400(body: bytes) -> None:
    try:
        assert isinstance(parse_chat_request(body), ChatCompletionRequest)
    except InvalidRequestError as err:
        assert err.http_status == 400 and err.code in ("invalid_json", "invalid_request")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_our_400(body: bytes) -> None:
    _parses_or_400(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json | _fields)
def test_any_json_parses_or_raises_our_400(value: Any) -> None:
    _parses_or_400(json.dumps(value).encode())


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=300_000), st.sampled_from(["[", '{"a":', '[{"a":']))
def test_any_nesting_depth_parses_or_raises_our_400(depth: int, opener: str) -> None:
    _parses_or_400((opener * depth).encode())
