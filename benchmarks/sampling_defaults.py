"""How often the local profile's SmolLM2-135M answers "What is the capital of France?"
with Paris, at its sampling defaults (``defaults`` on each version of
cluster/profiles/local.yaml) and at other settings, over seeded draws. No Ray: the hf
engine of the general model, with the defaults applied as the ModelServer applies them.

    .venv/bin/python benchmarks/sampling_defaults.py [--seeds 10] [--settings defaults 0 0.2 0.2,0.5 1.0]

A setting is ``temperature`` or ``temperature,top_p``; ``defaults`` is a request that sets
neither (so the version's defaults fill them). Results: docs/endpoints.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from cluster.loader import load_profile
from cluster.openai_endpoints import apply_defaults
from cluster.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine

QUESTION = "What is the capital of France?"


def _request(setting: str, seed: int) -> GenerationRequest:
    if setting == "defaults":  # what the gateway sends when the client sets neither (OpenAI's 1.0s, marked unset)
        sampling = SamplingParams(max_tokens=24, temperature=1.0, top_p=1.0, seed=seed)
        return GenerationRequest(f"r{seed}", (ChatMessage("user", QUESTION),), sampling, unset_sampling=frozenset({"temperature", "top_p"}))
    temperature, _, top_p = setting.partition(",")
    sampling = SamplingParams(max_tokens=24, temperature=float(temperature), top_p=float(top_p or 1.0), seed=seed)
    return GenerationRequest(f"r{seed}", (ChatMessage("user", QUESTION),), sampling)


async def main(seeds: int, settings: list[str]) -> None:
    version = load_profile("local").general.current
    engine = HFEngine(version.engine, system_prompt=version.system_prompt)
    await engine.start()
    try:
        for setting in settings:
            started, answers = time.perf_counter(), []
            for seed in range(seeds):
                request = apply_defaults(_request(setting, seed), version.defaults)
                answers.append("".join([c.text async for c in engine.generate(request)]))
            hits = sum("Paris" in a for a in answers)
            print(f"{setting:>10}: Paris in {hits}/{seeds} ({time.perf_counter() - started:.1f} s); "
                  f"a miss: {next((a[:50] for a in answers if 'Paris' not in a), '-')!r}")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=["defaults", "0", "0.2", "0.2,0.5", "1.0"])
    args = parser.parse_args()
    asyncio.run(main(args.seeds, args.settings))
