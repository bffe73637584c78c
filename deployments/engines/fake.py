"""A deterministic fake engine with latency, throughput, failure and stall knobs.

For tests, the ``sim`` profile and load tests. The text is a pure function of the prompt
(so answers are reproducible); failures and stalls are drawn from a seeded RNG.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import AsyncIterator

from cluster.config import FakeEngineConfig
from cluster.errors import EngineError, EngineTimeoutError, EngineUnavailableError
from cluster.types import EngineCapabilities, GenerationChunk, GenerationRequest, TokenLogprob, Usage
from deployments.engines.common import StopMatcher, with_system_prompt

_WORDS = (
    "the model answers quickly and well with small steps that keep every request cheap "
    "while the router sends hard questions to larger experts when needed"
).split()


def fake_tokens(prompt: str, count: int) -> list[str]:
    """``count`` deterministic word tokens derived from the prompt."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return [(" " if i else "") + rng.choice(_WORDS) for i in range(count)]


_FAILURES = {"engine_error": EngineError, "unavailable": EngineUnavailableError, "timeout": EngineTimeoutError}


class FakeEngine:
    capabilities = EngineCapabilities(streaming=True, logprobs=True)

    def __init__(self, config: FakeEngineConfig, *, system_prompt: str | None = None) -> None:
        self.config = config
        self.system_prompt = system_prompt
        self._rng = random.Random(config.seed)
        self._started = False
        self._healthy = True
        # Observability for tests: how many generations run now, and how many were aborted.
        self.active = 0
        self.aborted = 0
        self.completed = 0

    async def start(self) -> None:
        self._started = True

    async def shutdown(self) -> None:
        self._started = False

    async def check_health(self) -> None:
        if not self._started or not self._healthy:
            raise EngineUnavailableError("fake engine is not running")

    def set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._started:
            raise EngineUnavailableError("fake engine is not started")
        cfg = self.config
        messages = with_system_prompt(request, self.system_prompt)
        prompt = "\n".join(f"{m.role}: {m.content}" for m in messages)
        prompt_tokens = len(prompt.split())
        count = min(request.sampling.max_tokens, cfg.default_completion_tokens)
        tokens = fake_tokens(prompt, count)
        fail_early = self._rng.random() < cfg.failure_rate
        fail_mid_at = self._rng.randrange(1, max(2, count)) if self._rng.random() < cfg.midstream_failure_rate else None
        stall_at = self._rng.randrange(1, max(2, count)) if self._rng.random() < cfg.stall_rate else None

        self.active += 1
        finished = False
        try:
            if cfg.ttft_ms:
                await asyncio.sleep(cfg.ttft_ms / 1000)
            if fail_early:
                raise _FAILURES[cfg.failure_error]("fake engine failure (failure_rate)")
            stops = StopMatcher(request.sampling.stop)
            emitted = 0
            # The answer is cut by max_tokens when it is shorter than the natural answer.
            finish = "length" if request.sampling.max_tokens <= cfg.default_completion_tokens else "stop"
            for i, token in enumerate(tokens):
                if i and cfg.tokens_per_s:
                    await asyncio.sleep(1 / cfg.tokens_per_s)
                if fail_mid_at is not None and i == fail_mid_at:
                    raise EngineError("fake engine failure mid-stream (midstream_failure_rate)")
                if stall_at is not None and i == stall_at:
                    await asyncio.sleep(cfg.stall_s)
                text, hit = stops.feed(token)
                emitted += 1
                logprobs = (TokenLogprob(token=text, logprob=-0.05 * (1 + i % 7)),) if request.sampling.logprobs and text else ()
                if text:
                    yield GenerationChunk(text=text, logprobs=logprobs)
                if hit:
                    finish = "stop"
                    break
            else:
                tail = stops.flush()
                if tail:
                    yield GenerationChunk(text=tail)
            finished = True
            self.completed += 1
            yield GenerationChunk(finish_reason=finish, usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=emitted))
        finally:
            self.active -= 1
            if not finished:
                self.aborted += 1
