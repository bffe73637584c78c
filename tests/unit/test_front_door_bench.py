"""The front-door benchmark's pieces that run without Ray: its zero-latency upstream speaks
what the remote_openai engine and a plain client read, and the verdict applies the targets.
(The figures themselves are a script's, docs/benchmarks.md "Front door"; nothing is timed here.)"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import httpx
import pytest

from benchmarks import front_door
from cluster.config import RemoteOpenAIEngineConfig
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.engines.remote_openai import RemoteOpenAIEngine


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    answers = {False: front_door._completion_bytes("m"), True: front_door._stream_bytes("m")}
    server = await asyncio.start_server(lambda r, w: front_door._upstream_connection(r, w, answers), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        await server.wait_closed()


async def test_the_remote_openai_engine_reads_the_whole_streamed_answer(upstream: str) -> None:
    engine = RemoteOpenAIEngine(RemoteOpenAIEngineConfig(kind="remote_openai", base_url=upstream, model="m"))
    await engine.start()
    try:
        for _ in range(2):  # the second answer reuses the kept-alive connection
            request = GenerationRequest("r", (ChatMessage("user", front_door.PROMPT),), SamplingParams(max_tokens=16))
            chunks = [c async for c in engine.generate(request)]
            assert "".join(c.text for c in chunks).split() == ["word"] * front_door.ANSWER_TOKENS
            assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == front_door.ANSWER_TOKENS
    finally:
        await engine.shutdown()


async def test_a_plain_post_gets_one_json_completion(upstream: str) -> None:
    async with httpx.AsyncClient(base_url=upstream, trust_env=False) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):
            resp = await client.post("/chat/completions", json=body)
            assert resp.status_code == 200
            assert resp.json()["choices"][0]["message"]["content"].count("word") == front_door.ANSWER_TOKENS


def _rows(pt: tuple[float, float], named: tuple[float, float]) -> list[dict]:
    rows = []
    for path, (rps16, p50_1) in (("passthrough", pt), ("slm named", named), ("slm auto", named)):
        rows += [{"path": path, "concurrency": 16, "rps": rps16}, {"path": path, "concurrency": 1, "p50_ms": p50_1}]
    return rows


@pytest.mark.parametrize(
    ("named", "rps_ok", "p50_ok"),
    [((90.0, 11.5), True, True), ((89.0, 11.5), False, True), ((100.0, 11.6), True, False), ((50.0, 20.0), False, False)],
)
def test_the_verdict_applies_both_targets(named: tuple[float, float], rps_ok: bool, p50_ok: bool) -> None:
    line = front_door.verdict(_rows((100.0, 10.0), named))[0]
    assert line.startswith("slm named:")
    assert ("target >= 0.90: PASS" in line) is rps_ok
    assert ("target <= 1.15: PASS" in line) is p50_ok


async def test_the_in_process_variant_drives_both_apps_and_reports_the_gap(capsys: pytest.CaptureFixture[str]) -> None:
    from ray import serve

    from benchmarks import front_door_inprocess
    from deployments.gateway import metrics

    before = (metrics.make, serve.get_replica_context)
    await front_door_inprocess.run(requests=20, rounds=1, top=0)
    assert (metrics.make, serve.get_replica_context) == before  # its stand-ins do not leak into other tests
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("passthrough ", "slm named"))}
    assert set(lines) == {"passthrough", "slm"} and "slm-cluster's own request handling:" in out
