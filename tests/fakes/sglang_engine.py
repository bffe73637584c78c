"""An in-process fake of SGLang's ``Engine`` (``sglang.Engine``), for the adapter's contract and
unit tests on machines without SGLang or a GPU.

What it models, from SGLang's source (``srt/entrypoints/engine.py``,
``srt/managers/tokenizer_manager.py``, the scheduler's abort):
- The constructor takes ``ServerArgs`` fields as keyword arguments and refuses names
  ``ServerArgs`` does not have (``TypeError``, as the dataclass does). Like SGLang releases
  before the upstream guard, it installs a SIGQUIT handler with ``signal.signal``, which
  raises ``ValueError`` off the main thread.
- ``async_generate(input_ids=..., sampling_params=..., return_logprob=..., top_logprobs_num=...,
  stream=True, rid=...)`` returns an async generator of ``{"text", "output_ids", "meta_info"}``.
  ``text``, ``output_token_logprobs`` (``(logprob, token_id, None)`` per token) and, with
  ``top_logprobs_num=k``, ``output_top_logprobs`` (per token, the k most likely as such
  triples, most likely first; every third token is only the second most likely) are
  cumulative unless ``incremental_streaming_output=True`` (SGLang's default is cumulative).
  ``stream=False`` returns the final dict.
- ``finish_reason`` is ``None`` until the end, then ``{"type": "stop", "matched": ...}`` (EOS
  id or stop string, trimmed), ``{"type": "length", "length": n}`` or ``{"type": "abort",
  "message": ...}``.
- ``tokenizer_manager.abort_request(rid)`` does nothing unless ``rid`` is a live request (the
  tokenizer manager's check), then the scheduler aborts EVERY request whose rid starts with
  ``rid`` (its prefix match). Closing a stream drops the tokenizer manager's state for the rid
  without telling the scheduler, which keeps generating (``orphaned``).
- A prompt of ``context_length`` tokens or more is a ``ValueError`` ("The input (N tokens) is
  longer than the model's context length (M tokens)."); a duplicate live rid is a ValueError.
- ``kill()`` plays the scheduler dying: requests then never get an answer (they hang), which
  is what a one-token health probe with a timeout detects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from tests.fakes.chat_tokenizer import ANSWER_WORDS, FakeChatTokenizer, answer_ids
from tests.fakes.vllm_engine import ToolsChatTokenizer, fill

# The ServerArgs fields the adapter may pass (all real SGLang names).
SERVER_ARGS = frozenset({
    "model_path", "tokenizer_path", "tp_size", "dp_size", "mem_fraction_static", "context_length",
    "max_running_requests", "dtype", "quantization", "disable_cuda_graph", "incremental_streaming_output",
    "log_level", "random_seed", "chunked_prefill_size", "max_total_tokens", "trust_remote_code", "base_gpu_id",
})


@dataclass
class _Request:
    rid: str
    done: bool = False
    aborted: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class FakeTokenizerManager:
    def __init__(self, engine: "FakeSGLangEngine") -> None:
        self.tokenizer: FakeChatTokenizer = ToolsChatTokenizer()
        self.rid_to_state: dict[str, _Request] = {}
        self._engine = engine

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        if not abort_all and rid not in self.rid_to_state:
            return
        self._engine.abort_calls.append(rid)
        for req in self._engine.scheduled.values():  # the scheduler matches by prefix
            if not req.done and (abort_all or req.rid.startswith(rid)):
                req.aborted = True
                req.wake.set()
                self._engine.aborted.append(req.rid)


class FakeSGLangEngine:
    def __init__(self, *, answer_tokens: int = 48, token_delay_s: float = 0.001,
                 script: Callable[[list[int], dict[str, Any]], str | None] | None = None, **server_args: Any) -> None:
        unknown = set(server_args) - SERVER_ARGS
        if unknown:
            raise TypeError(f"ServerArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        if "model_path" not in server_args:
            raise TypeError("ServerArgs.__init__() missing 1 required positional argument: 'model_path'")
        self.server_args = server_args
        self.incremental = bool(server_args.get("incremental_streaming_output", False))
        self.context_length = int(server_args.get("context_length") or 2048)
        self.answer_tokens = answer_tokens
        self.token_delay_s = token_delay_s
        self.script = script  # (prompt ids, sampling params) -> the answer's text, or None for the usual words
        signal.signal(signal.SIGQUIT, signal.getsignal(signal.SIGQUIT))  # what older SGLang does, unguarded
        self.tokenizer_manager = FakeTokenizerManager(self)
        self.scheduled: dict[str, _Request] = {}
        self.aborted: list[str] = []  # rids the scheduler aborted
        self.abort_calls: list[str] = []  # abort_request calls that reached the scheduler
        self.orphaned: list[str] = []  # streams closed while the scheduler still ran them
        self.calls: list[dict[str, Any]] = []
        self.alive = True
        self.shutdowns = 0

    def kill(self) -> None:
        self.alive = False

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.alive = False

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int | None = None,
        stream: bool = False,
        rid: str | None = None,
        **_: Any,
    ) -> Any:
        params = dict(sampling_params or {})
        ids = list(input_ids if input_ids is not None else self.tokenizer_manager.tokenizer.encode(prompt or ""))
        if len(ids) >= self.context_length:
            raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length ({self.context_length} tokens).")
        top_p = float(params.get("top_p", 1.0))
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        rid = rid or uuid.uuid4().hex
        if rid in self.tokenizer_manager.rid_to_state:
            raise ValueError(f"Duplicate request ID detected: {rid}")
        self.calls.append({"input_ids": ids, "sampling_params": params, "return_logprob": return_logprob, "stream": stream, "rid": rid,
                           "top_logprobs_num": top_logprobs_num})
        req = self.scheduled[rid] = self.tokenizer_manager.rid_to_state[rid] = _Request(rid)
        outputs = self._outputs(req, ids, params, return_logprob, int(top_logprobs_num or 0) if return_logprob else 0)
        if stream:
            return outputs
        last = None
        async for last in outputs:
            pass
        return last

    async def _outputs(
        self, req: _Request, prompt_ids: list[int], params: dict[str, Any], want_logprobs: bool, top: int
    ) -> AsyncIterator[dict[str, Any]]:
        tokenizer = self.tokenizer_manager.tokenizer
        temperature = float(params.get("temperature", 1.0))
        text = self.script(prompt_ids, params) if self.script is not None else None
        if text is None and params.get("json_schema"):  # decoding held to the schema
            text = json.dumps(fill(json.loads(params["json_schema"])))
        if text is not None:
            answer = [tokenizer.token_id(word) for word in text.split()]
        else:
            answer = answer_ids(tokenizer, prompt_ids, self.answer_tokens, params.get("sampling_seed") if temperature > 0 else None)
        answer.append(tokenizer.eos_token_id)
        max_new = int(params.get("max_new_tokens", 128))
        stops = list(params.get("stop") or ())
        text, out_ids, lps, tops = "", [], [], []  # type: ignore[var-annotated]
        sent_text, sent_lps = 0, 0
        try:
            for n, token in enumerate(answer[:max_new], start=1):
                while not self.alive:  # a dead scheduler never answers
                    await asyncio.sleep(3600)
                try:
                    await asyncio.wait_for(req.wake.wait(), self.token_delay_s)
                except asyncio.TimeoutError:
                    pass
                if req.aborted:
                    req.done = True
                    cut = sent_lps if self.incremental else 0
                    yield self._dict(req, "" if self.incremental else text, out_ids, (lps[cut:], tops[cut:] if top else None),
                                     len(prompt_ids), {"type": "abort", "message": "Abort in waiting queue"}, want_logprobs)
                    return
                piece = "" if token == tokenizer.eos_token_id else tokenizer.token_text(token)
                out_ids.append(token)
                position = self._top_logprobs(n, token)
                lps.append(next(e for e in position if e[1] == token))
                tops.append(position[:top])
                finish: dict[str, Any] | None = None
                hit = next((s for s in stops if s in text + piece), None)
                if hit is not None:
                    text, finish = (text + piece)[: (text + piece).index(hit)], {"type": "stop", "matched": hit}
                else:
                    text += piece
                    if token == tokenizer.eos_token_id:
                        finish = {"type": "stop", "matched": token}
                    elif n == max_new:
                        finish = {"type": "length", "length": max_new}
                cut = sent_lps if self.incremental else 0
                chunk_text = text[sent_text:] if self.incremental else text
                chunk_lps = (lps[cut:], tops[cut:] if top else None)
                sent_text, sent_lps = len(text), len(lps)
                req.done = finish is not None
                yield self._dict(req, chunk_text, out_ids, chunk_lps, len(prompt_ids), finish, want_logprobs)
                if finish is not None:
                    return
        except (GeneratorExit, asyncio.CancelledError):
            if not req.done and not req.aborted:
                self.orphaned.append(req.rid)
            raise
        finally:
            self.tokenizer_manager.rid_to_state.pop(req.rid, None)

    def _top_logprobs(self, n: int, token: int) -> list[tuple[float, int, None]]:
        """Token ``n``'s 20 most likely tokens (the most a request asks for), most likely first,
        the sampled one among them."""
        rank = 2 if n % 3 == 0 else 1  # every third token is not the most likely one
        tokenizer = self.tokenizer_manager.tokenizer
        others = [i for i in dict.fromkeys(tokenizer.token_id(w) for w in ANSWER_WORDS) if i != token]
        others = others[n % len(others) :] + others[: n % len(others)]
        ids = others[:19]
        ids.insert(rank - 1, token)
        return [(-0.05 * (n % 5) - 0.7 * r, tid, None) for r, tid in enumerate(ids)]

    @staticmethod
    def _dict(req: _Request, text: str, ids: list[int], lps: tuple[list[Any], list[Any] | None], prompt_tokens: int, finish: Any,
              want_logprobs: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {"id": req.rid, "prompt_tokens": prompt_tokens, "completion_tokens": len(ids), "finish_reason": finish}
        if want_logprobs:
            meta["output_token_logprobs"] = list(lps[0])
            if lps[1] is not None:
                meta["output_top_logprobs"] = list(lps[1])
        return {"text": text, "output_ids": list(ids), "meta_info": meta}


# --- SGLang's function calling (srt/function_call/function_call_parser.py, hermes_detector.py) ---


@dataclass
class ToolCallItem:
    tool_index: int
    name: str | None = None
    parameters: str = ""


@dataclass
class _Detector:
    prev_tool_call_arr: list[dict[str, Any]] = field(default_factory=list)
    streamed_args_for_tool: list[str] = field(default_factory=list)
    current_tool_id: int = -1


class FakeFunctionCallParser:
    """Plays SGLang's ``FunctionCallParser`` over its ``HermesDetector``
    (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``): ``parse_stream_chunk(text)``
    buffers and returns (normal text, ``ToolCallItem``s): the name alone on a call's first item
    (``parameters=""``), then argument characters as they come, the last two held back while
    the call is open; the previous call's rest goes out when the next starts, the last call's
    rest never (SGLang's server sends it from ``detector.prev_tool_call_arr`` against
    ``streamed_args_for_tool``). ``parse_stream_end()`` releases held-back normal text. An unknown
    parser name is a ``ValueError``, as SGLang's."""

    START, END = "<tool_call>", "</tool_call>"
    NAMES = frozenset({"hermes", "qwen25"})

    def __init__(self, tools: list[Any], tool_call_parser: str) -> None:
        if tool_call_parser not in self.NAMES:
            raise ValueError(f"Unsupported tool_call_parser: {tool_call_parser}")
        self.tools = tools
        self.detector = _Detector()
        self._buffer = ""
        self._normal_sent = 0

    def parse_stream_chunk(self, chunk_text: str) -> tuple[str, list[ToolCallItem]]:
        self._buffer += chunk_text
        d = self.detector
        if self.START not in self._buffer:
            keep = len(self._buffer) - max((k for k in range(1, len(self.START)) if self._buffer.endswith(self.START[:k])), default=0)
            normal, self._normal_sent = self._buffer[self._normal_sent : keep], keep
            return normal, []
        head = self._buffer.index(self.START)
        normal, self._normal_sent = self._buffer[self._normal_sent : head], max(self._normal_sent, head)
        items: list[ToolCallItem] = []
        segments = self._buffer.split(self.START)[1:]
        for index, segment in enumerate(segments):
            body = segment.split(self.END)[0].strip()
            if index > d.current_tool_id:
                name = re.search(r'"name":\s*"([^"]+)"', body)
                if name is None:
                    break
                if d.current_tool_id >= 0:
                    items += self._rest(d.current_tool_id)
                d.current_tool_id = index
                d.streamed_args_for_tool.append("")
                d.prev_tool_call_arr.append({"name": name.group(1), "arguments": {}})
                items.append(ToolCallItem(index, name=name.group(1), parameters=""))
            if index == d.current_tool_id:
                args = re.search(r'"arguments":\s*(.*)', body, re.S)
                if args is not None:
                    raw = args.group(1)[:-1] if self.END in segment else args.group(1)
                    if self.END in segment:
                        with contextlib.suppress(ValueError):
                            d.prev_tool_call_arr[index]["arguments"] = json.loads(raw)
                    new = raw[:-2][len(d.streamed_args_for_tool[index]) :]
                    if new:
                        d.streamed_args_for_tool[index] += new
                        items.append(ToolCallItem(index, parameters=new))
        return normal, items

    def parse_stream_end(self) -> tuple[str, list[ToolCallItem]]:
        if self.START in self._buffer:
            return "", []
        normal, self._normal_sent = self._buffer[self._normal_sent :], len(self._buffer)
        return normal, []

    def _rest(self, index: int) -> list[ToolCallItem]:
        d = self.detector
        full = json.dumps(d.prev_tool_call_arr[index]["arguments"])
        rest = full[len(d.streamed_args_for_tool[index]) :]
        d.streamed_args_for_tool[index] = full
        return [ToolCallItem(index, parameters=rest)] if rest else []


def fake_function_call_parser(name: str, tools: tuple[dict[str, Any], ...]) -> FakeFunctionCallParser:
    """What ``load_function_call_parser`` returns, minus SGLang."""
    return FakeFunctionCallParser(list(tools), name)
