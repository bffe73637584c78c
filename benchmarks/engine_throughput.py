"""Tokens/s of one engine adapter at 1, 8 and 32 concurrent requests, for any engine kind.

The engine is built from an engine config (the same JSON/YAML block a model version has), so
the same script measures ``fake`` here and real ``vllm`` / ``sglang`` on a GPU machine
(``scripts/gpu_smoke.sh``). Each level starts N greedy requests at once, ``--rounds`` times;
tokens/s is all completion tokens over all wall time; TTFT is per request.

    python -m benchmarks.engine_throughput --engine '{"kind": "fake", "tokens_per_s": 200, "default_completion_tokens": 128}'
    python -m benchmarks.engine_throughput --engine '{"kind": "vllm", "model": "Qwen/Qwen2.5-0.5B-Instruct"}' --json-out out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from pydantic import TypeAdapter

from benchmarks.stats import percentile, table
from cluster.config import EngineConfig
from cluster.protocols import Engine
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.engines import create_engine

PROMPTS = (
    "Write a detailed essay about the history of the Roman Empire.",
    "Explain step by step how a compiler turns source code into machine code.",
    "Tell me a long story about a dragon who learns to bake bread.",
    "Describe how the internet works, from cables to web pages.",
)


async def one(engine: Engine, i: int, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first text chunk) of one greedy request."""
    request = GenerationRequest(
        request_id=f"bench-{i}",
        messages=(ChatMessage("user", PROMPTS[i % len(PROMPTS)]),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    start, ttft, tokens = time.perf_counter(), None, 0
    async for chunk in engine.generate(request):
        if ttft is None and chunk.text:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, ttft if ttft is not None else time.perf_counter() - start


async def level(engine: Engine, concurrency: int, rounds: int, max_tokens: int) -> dict:
    tokens, ttfts, wall = 0, [], 0.0
    for r in range(rounds):
        start = time.perf_counter()
        results = await asyncio.gather(*(one(engine, r * concurrency + i, max_tokens) for i in range(concurrency)))
        wall += time.perf_counter() - start
        tokens += sum(t for t, _ in results)
        ttfts += [s for _, s in results]
    return {
        "concurrency": concurrency,
        "requests": concurrency * rounds,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p95_ms": round(percentile(ttfts, 95) * 1000, 1),
    }


async def run(config: EngineConfig, levels: list[int], rounds: int, max_tokens: int, warmup: int) -> list[dict]:
    engine = create_engine(config)
    await engine.start()
    try:
        await asyncio.gather(*(one(engine, i, 8) for i in range(warmup)))  # CUDA graphs, caches
        return [await level(engine, c, rounds, max_tokens) for c in levels]
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="engine config as JSON (a model version's `engine` block)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    config = TypeAdapter(EngineConfig).validate_python(json.loads(args.engine))
    levels = [int(x) for x in args.levels.split(",")]
    rows = asyncio.run(run(config, levels, args.rounds, args.max_tokens, args.warmup))
    print(f"engine: {config.kind}  max_tokens={args.max_tokens}  rounds={args.rounds}")
    print(table(rows, ["concurrency", "requests", "completion_tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms"]))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"engine": json.loads(args.engine), "levels": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
