"""An in-process fake of vLLM's ``AsyncLLM`` (V1) and ``SamplingParams``, for the adapter's
contract and unit tests on machines without vLLM or a GPU.

What it models, from vLLM's source:
- ``generate(prompt, sampling_params, request_id)`` is an async generator of ``RequestOutput``
  (``request_id``, ``prompt_token_ids``, ``outputs=[CompletionOutput]``, ``finished``); with
  ``output_kind=DELTA`` each ``CompletionOutput`` carries only the new ``text``, ``token_ids``
  and ``logprobs`` (per position ``{token_id: Logprob(logprob, rank, decoded_token)}``: the
  sampled token first with its vocabulary rank, then, for ``logprobs=k``, the k most likely
  tokens with ranks 1..k, as ``LogprobsProcessor._make_logprob_dict`` builds it; every third
  position the sampled token is only the second most likely);
  ``finish_reason`` is ``None`` until the end, then "stop" (EOS or a stop string, the stop
  string trimmed and ``stop_reason`` set to it), "length" or "abort".
- A prompt longer than ``max_model_len``, or ``logprobs`` above ``max_logprobs`` (20, vLLM's
  default), is refused with ``VLLMValidationError`` (a ``ValueError``) before anything runs;
  a request id already running is a ``ValueError``.
- ``abort(request_id)`` ends the request: its stream yields a final output with
  finish_reason "abort". ``generate`` aborts by itself when its generator is closed or
  cancelled (vLLM's ``except (CancelledError, GeneratorExit): abort``); aborting an id that is
  no longer running does nothing.
- ``engine_abort(request_id)`` plays an abort the engine decides on its own (a preempted
  request whose KV load failed, a pause): the client sees finish_reason "abort".
- ``kill()`` plays the engine core dying: running streams and later calls raise
  ``EngineDeadError``; ``check_health()`` raises it too.
- ``SamplingParams`` validates like vLLM's (``temperature >= 0``, ``0 < top_p <= 1``,
  ``max_tokens >= 1``, ``logprobs >= 0``); a seed outside int64 fails in the engine core.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable

from cluster.config import VLLMEngineConfig
from deployments.engines.vllm import VLLMBackend
from tests.fakes.chat_tokenizer import ANSWER_WORDS, FakeChatTokenizer, answer_ids


class EngineDeadError(Exception):
    """Named as vLLM's (``vllm.v1.engine.exceptions``); the adapter matches by name."""


class EngineGenerateError(Exception):
    """Named as vLLM's wrapper of failures inside ``generate``."""


class VLLMValidationError(ValueError):
    """Named as vLLM's request validation error."""


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class FakeSamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    structured_outputs: dict[str, Any] | None = None  # the real one takes StructuredOutputsParams
    output_kind: str = "CUMULATIVE"

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise VLLMValidationError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise VLLMValidationError(f"logprobs must be non-negative, got {self.logprobs}.")


class FakeAsyncLLM:
    def __init__(self, *, max_model_len: int = 2048, answer_tokens: int = 48, token_delay_s: float = 0.001) -> None:
        self.tokenizer = FakeChatTokenizer()
        self.max_model_len = max_model_len
        self.max_logprobs = 20  # ModelConfig.max_logprobs
        self.answer_tokens = answer_tokens
        self.token_delay_s = token_delay_s
        self.running: dict[str, asyncio.Event] = {}  # request id -> its abort flag
        self._engine_aborts: set[str] = set()
        self.aborted: list[str] = []  # requests that abort() ended (ours or vLLM's own)
        self.abort_calls: list[str] = []
        self.calls: list[tuple[list[int], FakeSamplingParams, str]] = []
        self.dead = False
        self.shutdowns = 0

    def get_tokenizer(self) -> FakeChatTokenizer:
        return self.tokenizer

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.dead = True

    def kill(self) -> None:
        self.dead = True
        for flag in self.running.values():
            flag.set()

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            self.abort_calls.append(rid)
            flag = self.running.get(rid)
            if flag is not None and not flag.is_set():
                self.aborted.append(rid)
                flag.set()

    def engine_abort(self, request_id: str) -> None:
        self._engine_aborts.add(request_id)
        flag = self.running.get(request_id)
        if flag is not None:
            flag.set()

    async def generate(self, prompt: dict[str, Any], sampling_params: FakeSamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue.")
        prompt_ids = list(prompt["prompt_token_ids"])
        if len(prompt_ids) > self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum model length of {self.max_model_len}."
            )
        if sampling_params.logprobs is not None and sampling_params.logprobs > self.max_logprobs:
            raise VLLMValidationError(
                f"Requested sample logprobs of {sampling_params.logprobs}, which is greater than max allowed: {self.max_logprobs}"
            )
        if request_id in self.running:
            raise ValueError(f"Request id {request_id} already running.")
        self.calls.append((prompt_ids, sampling_params, request_id))
        flag = self.running[request_id] = asyncio.Event()
        try:
            async for output in self._steps(prompt_ids, sampling_params, request_id, flag):
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise
        finally:
            self.running.pop(request_id, None)

    async def _steps(self, prompt_ids: list[int], params: FakeSamplingParams, rid: str, flag: asyncio.Event) -> AsyncIterator[RequestOutput]:
        if params.seed is not None and not -(2**63) <= params.seed < 2**63:
            raise EngineGenerateError("RuntimeError: Overflow when unpacking long")  # torch.Generator.manual_seed
        answer = answer_ids(self.tokenizer, prompt_ids, self.answer_tokens, params.seed if params.temperature > 0 else None)
        answer.append(self.tokenizer.eos_token_id)
        delta = params.output_kind == "DELTA"
        text_so_far, ids_so_far, lps_so_far = "", [], []
        for n, token in enumerate(answer[: params.max_tokens], start=1):
            await asyncio.sleep(self.token_delay_s)
            if flag.is_set():
                if self.dead:
                    raise EngineDeadError("EngineCore encountered an issue.")
                yield self._output(rid, prompt_ids, "", [], None, "abort", None)
                return
            piece = "" if token == self.tokenizer.eos_token_id else self.tokenizer.token_text(token)
            lp = self._position(n, token, piece, params.logprobs) if params.logprobs is not None else None
            finish, stop_reason = None, None
            hit = next((s for s in params.stop if s in text_so_far + piece), None)
            if hit is not None:  # vLLM trims the stop string and everything after it
                cut = (text_so_far + piece).index(hit)
                piece, finish, stop_reason = (text_so_far + piece)[len(text_so_far) : cut], "stop", hit
            elif token == self.tokenizer.eos_token_id:
                finish = "stop"
            elif n == params.max_tokens:
                finish = "length"
            if delta:
                yield self._output(rid, prompt_ids, piece, [token], [lp] if lp else None, finish, stop_reason)
            else:
                text_so_far += piece
                ids_so_far.append(token)
                lps_so_far += [lp] if lp else []
                yield self._output(rid, prompt_ids, text_so_far, list(ids_so_far), list(lps_so_far) or None, finish, stop_reason)
            if delta:
                text_so_far += piece
            if finish is not None:
                return

    def _position(self, n: int, token: int, piece: str, k: int) -> dict[int, Logprob]:
        """Position ``n``'s logprobs, built as vLLM V1 does: the sampled token first with its
        rank, then the ``k`` most likely tokens, ranks 1..k (a token already there keeps its
        place and takes the later value)."""
        rank = 2 if n % 3 == 0 else 1  # every third token is not the most likely one

        def logprob(r: int) -> float:
            return -0.05 * (n % 5) - 0.7 * (r - 1)

        others = [i for i in dict.fromkeys(self.tokenizer.token_id(w) for w in ANSWER_WORDS) if i != token]
        others = others[n % len(others) :] + others[: n % len(others)]
        by_rank = others[: max(k, rank) - 1]
        by_rank.insert(rank - 1, token)
        out = {token: Logprob(logprob(rank), rank, piece)}
        for r in range(1, k + 1):
            tid = by_rank[r - 1]
            out[tid] = Logprob(logprob(r), r, piece if tid == token else self.tokenizer.token_text(tid))
        return out

    def _output(self, rid: str, prompt_ids: list[int], text: str, ids: list[int], lps: Any, finish: str | None, stop: Any) -> RequestOutput:
        if finish == "abort" and rid in self._engine_aborts:
            self._engine_aborts.discard(rid)
        cum = sum(p[i].logprob for p, i in zip(lps or [], ids)) if lps else None
        completion = CompletionOutput(0, text, ids, None if cum is None or math.isnan(cum) else cum, lps, finish, stop)
        return RequestOutput(rid, None, prompt_ids, None, [completion], finish is not None)


def fake_vllm_backend(config: VLLMEngineConfig | None = None, **knobs: Any) -> VLLMBackend:
    """A ``VLLMBackend`` over ``FakeAsyncLLM``: what ``load_vllm_backend`` returns, minus vLLM.
    ``knobs`` go to ``FakeAsyncLLM`` (``answer_tokens``, ``token_delay_s``, ``max_model_len``)."""
    if config is not None and config.max_model_len is not None:
        knobs.setdefault("max_model_len", config.max_model_len)
    llm = FakeAsyncLLM(**knobs)
    return VLLMBackend(llm=llm, make_sampling_params=lambda kw: FakeSamplingParams(**kw, output_kind="DELTA"))
