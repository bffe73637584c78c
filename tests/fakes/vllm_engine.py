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
import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

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
    n: int = 1
    skip_special_tokens: bool = True
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
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")


class FakeAsyncLLM:
    def __init__(self, *, max_model_len: int = 2048, answer_tokens: int = 48, token_delay_s: float = 0.001,
                 script: Callable[[list[int], FakeSamplingParams, int], str | None] | None = None) -> None:
        self.tokenizer = ToolsChatTokenizer()
        self.script = script  # (prompt ids, params, choice index) -> the answer's text, or None for the usual words
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
        """One ``RequestOutput`` per engine step. With ``n`` > 1 vLLM runs n child requests
        (``{i}_{rid}``, seed + i each) and a step's output holds only the children that made a
        token in it (here: even children every step, odd ones every other step, as when the
        scheduler cannot fit all of them), each ``CompletionOutput`` tagged with its ``index``;
        a child that finished is not sent again, and ``finished`` waits for the last one."""
        if params.seed is not None and not -(2**63) <= params.seed < 2**63:
            raise EngineGenerateError("RuntimeError: Overflow when unpacking long")  # torch.Generator.manual_seed
        children = [_Child(i, self._answer(prompt_ids, params, i)) for i in range(params.n)]
        delta = params.output_kind == "DELTA"
        step = 0
        while True:
            step += 1
            await asyncio.sleep(self.token_delay_s)
            if flag.is_set():
                if self.dead:
                    raise EngineDeadError("EngineCore encountered an issue.")
                aborted = [CompletionOutput(c.index, "", [], None, None, "abort") for c in children if c.finish is None]
                yield RequestOutput(rid, None, prompt_ids, None, aborted, True)
                return
            moved = [c for c in children if c.finish is None and (c.index % 2 == 0 or step % 2 == 0)]
            outputs = [self._advance(c, params, delta) for c in moved]
            done = all(c.finish is not None for c in children)
            if outputs:
                yield RequestOutput(rid, None, prompt_ids, None, outputs, done)
            if done:
                return

    def _answer(self, prompt_ids: list[int], params: FakeSamplingParams, index: int) -> list[int]:
        """Child ``index``'s tokens: the scripted text (``script``), a JSON value of the schema
        when decoding is held to one (``structured_outputs``), or prompt-derived words; each
        child's answer is three tokens shorter than the one before, then EOS."""
        text = self.script(prompt_ids, params, index) if self.script is not None else None
        schema = (params.structured_outputs or {}).get("json")
        if text is None and schema is not None:
            text = json.dumps(fill(schema))
        if text is not None:
            answer = [self.tokenizer.token_id(word) for word in text.split()]
        else:
            seed = params.seed + index if params.seed is not None and params.temperature > 0 else None
            answer = answer_ids(self.tokenizer, prompt_ids, max(1, self.answer_tokens - 3 * index), seed)
        return answer + [self.tokenizer.eos_token_id]

    def _advance(self, child: "_Child", params: FakeSamplingParams, delta: bool) -> CompletionOutput:
        token = child.answer[child.sent]
        child.sent += 1
        n = child.sent
        piece = "" if token == self.tokenizer.eos_token_id else self.tokenizer.token_text(token)
        lp = self._position(n, token, piece, params.logprobs) if params.logprobs is not None else None
        finish, stop_reason = None, None
        hit = next((s for s in params.stop if s in child.text + piece), None)
        if hit is not None:  # vLLM trims the stop string and everything after it
            cut = (child.text + piece).index(hit)
            piece, finish, stop_reason = (child.text + piece)[len(child.text) : cut], "stop", hit
        elif token == self.tokenizer.eos_token_id:
            finish = "stop"
        elif n == params.max_tokens:
            finish = "length"
        child.finish = finish
        child.text += piece
        child.ids.append(token)
        child.lps += [lp] if lp else []
        if delta:
            return self._completion(child.index, piece, [token], [lp] if lp else None, finish, stop_reason)
        return self._completion(child.index, child.text, list(child.ids), list(child.lps) or None, finish, stop_reason)

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

    @staticmethod
    def _completion(index: int, text: str, ids: list[int], lps: Any, finish: str | None, stop: Any) -> CompletionOutput:
        cum = sum(p[i].logprob for p, i in zip(lps or [], ids)) if lps else None
        return CompletionOutput(index, text, ids, None if cum is None or math.isnan(cum) else cum, lps, finish, stop)


@dataclass
class _Child:
    index: int
    answer: list[int]
    sent: int = 0
    text: str = ""
    ids: list[int] = field(default_factory=list)
    lps: list[Any] = field(default_factory=list)
    finish: str | None = None


def fill(schema: dict[str, Any]) -> Any:
    """A value of a (simple) JSON schema, as constrained decoding would make one: the first
    of ``anyOf``/``enum``, every property, ``minItems`` items (at least one)."""
    if "anyOf" in schema:
        return fill({**{k: v for k, v in schema.items() if k != "anyOf"}, **schema["anyOf"][0]})
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        return {name: fill(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [fill(schema.get("items") or {"type": "string"}) for _ in range(max(1, schema.get("minItems", 1)))]
    return {"string": "Paris", "integer": 1, "number": 1.5, "boolean": True}.get(kind)


class ToolsChatTokenizer(FakeChatTokenizer):
    """The shared fake tokenizer, with a chat template that takes Hugging Face's ``tools=``
    (it lists the function names after the conversation, as tool-calling templates describe
    the tools to the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.tools_seen: list[list[dict[str, Any]]] = []

    def apply_chat_template(self, conversation: list[dict[str, str]], *, tokenize: bool = True, add_generation_prompt: bool = False,
                            tools: list[dict[str, Any]] | None = None) -> str:
        text = super().apply_chat_template(conversation, tokenize=tokenize, add_generation_prompt=add_generation_prompt)
        if tools:
            self.tools_seen.append(tools)
            text = f"<|tools|> {' '.join(t['function']['name'] for t in tools)} " + text
        return text


# --- vLLM's tool parsing (vllm/tool_parsers/abstract_tool_parser.py, hermes_tool_parser.py) ---


@dataclass
class DeltaFunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaToolCall:
    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


@dataclass
class DeltaMessage:
    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass
class FakeChatCompletionRequest:
    tools: list[dict[str, Any]]
    tool_choice: Any = "auto"
    skip_special_tokens: bool = True


class FakeHermesToolParser:
    """Plays vLLM's ``Hermes2ProToolParser`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``)
    the way its streaming side behaves, with the base class's state (``prev_tool_call_arr``,
    ``streamed_args_for_tool``, ``current_tool_id``):

    - text before the first ``<tool_call>`` is content; nothing after it is;
    - a call's first delta carries ``id``, ``type`` and the function's ``name`` only; its
      arguments then stream as they are generated, the last two characters held back while
      the call is open (they may be the closing braces);
    - when the next call starts, the previous call's held-back arguments go out with it; the
      LAST call's are never streamed: vLLM's server sends them at the end by comparing
      ``prev_tool_call_arr`` with ``streamed_args_for_tool`` (what the adapter must do too);
    - ``adjust_request`` asks for special tokens in the text (``skip_special_tokens=False``),
      as the real one does when its markers are special tokens.
    """

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, tokenizer: Any) -> None:
        self.model_tokenizer = tokenizer
        self.prev_tool_call_arr: list[dict[str, Any]] = []
        self.current_tool_id = -1
        self.current_tool_name_sent = False
        self.streamed_args_for_tool: list[str] = []
        self.calls = 0

    def adjust_request(self, request: FakeChatCompletionRequest) -> FakeChatCompletionRequest:
        request.skip_special_tokens = False
        return request

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str, previous_token_ids: Any,
                                     current_token_ids: Any, delta_token_ids: Any, request: FakeChatCompletionRequest) -> DeltaMessage | None:
        self.calls += 1
        assert current_text == previous_text + delta_text and list(current_token_ids) == list(previous_token_ids) + list(delta_token_ids)
        if self.START not in current_text:
            return DeltaMessage(content=delta_text)
        content = delta_text.split(self.START)[0] if self.START not in previous_text else ""
        segments = current_text.split(self.START)[1:]
        pieces: list[DeltaToolCall] = []
        for index, segment in enumerate(segments):
            body = segment.split(self.END)[0].strip()
            if index > self.current_tool_id:
                name = re.search(r'"name":\s*"([^"]+)"', body)
                if name is None:
                    break
                if self.current_tool_id >= 0:  # the previous call's held-back arguments
                    pieces += self._rest(self.current_tool_id, segments[self.current_tool_id])
                self.current_tool_id = index
                self.streamed_args_for_tool.append("")
                self.prev_tool_call_arr.append({"name": name.group(1), "arguments": {}})
                pieces.append(DeltaToolCall(index, id=f"chatcmpl-tool-{index}", type="function", function=DeltaFunctionCall(name=name.group(1))))
            if index == self.current_tool_id:
                args = re.search(r'"arguments":\s*(.*)', body, re.S)
                if args is not None:
                    raw = args.group(1)[:-1] if self.END in segment else args.group(1)  # the call object's own closing brace
                    if self.END in segment:
                        with contextlib.suppress(ValueError):
                            self.prev_tool_call_arr[index]["arguments"] = json.loads(raw)
                    available = raw[:-2]
                    new = available[len(self.streamed_args_for_tool[index]) :]
                    if new:
                        self.streamed_args_for_tool[index] += new
                        pieces.append(DeltaToolCall(index, function=DeltaFunctionCall(arguments=new)))
        if not pieces and not content:
            return None
        return DeltaMessage(content=content or None, tool_calls=pieces)

    def _rest(self, index: int, segment: str) -> list[DeltaToolCall]:
        full = json.dumps(self.prev_tool_call_arr[index]["arguments"])
        rest = full[len(self.streamed_args_for_tool[index]) :]
        self.streamed_args_for_tool[index] = full
        return [DeltaToolCall(index, function=DeltaFunctionCall(arguments=rest))] if rest else []


TOOL_PARSERS = {"hermes": FakeHermesToolParser}


def fake_tool_parser_factory(name: str) -> Any:
    """What ``load_tool_parser_factory`` returns, over the fake parsers (``KeyError`` for an
    unknown name, as ``ToolParserManager.get_tool_parser``)."""
    parser_cls = TOOL_PARSERS[name]
    made: list[FakeHermesToolParser] = []

    def make(tokenizer: Any, tools: tuple[dict[str, Any], ...], tool_choice: Any) -> tuple[Any, Any, dict[str, Any]]:
        request = FakeChatCompletionRequest(tools=list(tools), tool_choice=tool_choice or "auto")
        parser = parser_cls(tokenizer)
        made.append(parser)
        request = parser.adjust_request(request)
        return parser, request, ({} if request.skip_special_tokens else {"skip_special_tokens": False})

    make.made = made  # type: ignore[attr-defined]
    return make


def fake_vllm_backend(config: VLLMEngineConfig | None = None, **knobs: Any) -> VLLMBackend:
    """A ``VLLMBackend`` over ``FakeAsyncLLM``: what ``load_vllm_backend`` returns, minus vLLM.
    ``knobs`` go to ``FakeAsyncLLM`` (``answer_tokens``, ``token_delay_s``, ``max_model_len``,
    ``script``); the config's ``tool_parser`` picks a fake parser."""
    if config is not None and config.max_model_len is not None:
        knobs.setdefault("max_model_len", config.max_model_len)
    llm = FakeAsyncLLM(**knobs)
    parsers = fake_tool_parser_factory(config.tool_parser) if config is not None and config.tool_parser else None
    return VLLMBackend(llm=llm, make_sampling_params=lambda kw: FakeSamplingParams(**kw, output_kind="DELTA"), make_tool_parser=parsers)
