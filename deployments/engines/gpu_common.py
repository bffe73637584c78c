"""What the in-process GPU engine adapters (vLLM, SGLang) share.

- ``request_prompt_ids``: a request's prompt token ids through the engine's own tokenizer:
  the chat template for messages (``render_prompt_ids``), the text as is for a raw prompt.
- ``merge_streams``: several engine streams as one (SGLang's ``n`` choices).
- ``drive_stream``: runs one engine stream; translates the library's failures into typed
  errors and aborts the request in the engine when the consumer leaves early.
- ``ChunkAssembler``: turns per-step deltas into ``GenerationChunk``s (text in order, logprobs
  riding with their text, then exactly one final chunk); ``Choices`` does it for ``n`` choices
  (chunks tagged with their choice's ``index``, one final chunk once every choice finished).
- ``TokenizerThread``: runs chat templating and tokenisation off the event loop.
- ``signal_handlers_guarded``: lets an engine constructor that installs signal handlers run
  off the main thread (a Serve replica's constructor, ``asyncio.to_thread``).
- ``check_seed``: the seed range every engine accepts (a signed 64-bit integer).

Nothing here imports an engine library: the adapters hand in the library's objects.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol, Sequence, TypeVar

from cluster.errors import ContextLengthExceededError, EngineError, InvalidRequestError, SLMError
from cluster.types import ChatMessage, FinishReason, GenerationChunk, GenerationRequest, TokenLogprob, Usage
from deployments.engines.common import StopMatcher, messages_as_dicts, with_system_prompt

log = logging.getLogger("ray.serve")

T = TypeVar("T")

# How engines word "the prompt does not fit": vLLM ("The decoder prompt (length N) is longer
# than the maximum model length of M"), SGLang ("The input (N tokens) is longer than the
# model's context length (M tokens)", "Requested token count exceeds the model's maximum
# context length").
_CONTEXT_LENGTH_PHRASES = (
    "maximum model length",
    "model's context length",
    "maximum context length",
    "context length",
)


class ChatTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the adapters use."""

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


def render_prompt_ids(tokenizer: ChatTokenizer, messages: tuple[ChatMessage, ...], tools: Sequence[Any] = ()) -> list[int]:
    """The prompt token ids for ``messages`` under the model's chat template (with ``tools``,
    OpenAI's tool dicts, passed to the template as Hugging Face's ``tools=`` when there are
    any: the model only calls functions its prompt describes).

    Renders to text, then encodes without special tokens (as vLLM's own chat path does): the
    template already wrote BOS, and encoding the text plainly would add a second one.
    Raises ``InvalidRequestError`` when the template itself rejects the conversation (a
    ``raise_exception`` in the Jinja template, e.g. roles that do not alternate) and
    ``EngineError`` for any other failure, which is a deployment problem, not the client's.
    """
    try:
        extra = {"tools": list(tools)} if tools else {}
        text = tokenizer.apply_chat_template(messages_as_dicts(messages), tokenize=False, add_generation_prompt=True, **extra)
        return list(tokenizer.encode(text, add_special_tokens=False))
    except Exception as exc:
        if has_class_named(exc, "TemplateError"):
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc
        raise EngineError(f"could not apply the model's chat template: {exc}") from exc


def request_prompt_ids(tokenizer: ChatTokenizer, request: GenerationRequest, system_prompt: str | None) -> list[int]:
    """The prompt token ids for ``request``.

    A raw prompt (``request.prompt``, from /v1/completions) is the client's text as is: no
    chat template, no system prompt, encoded WITH the tokenizer's special tokens (BOS), which
    is how vLLM and SGLang encode a text prompt themselves (``tokenizer.encode(text)``). It is
    encoded here rather than handed over as text so that tokenisation stays on the adapter's
    tokenizer thread: both engines would otherwise encode it on the replica's event loop.
    Chat messages get ``system_prompt`` (unless they bring one) and the chat template, which
    also gets the request's ``tools``.
    """
    if request.prompt is None:
        return render_prompt_ids(tokenizer, with_system_prompt(request, system_prompt), request.sampling.tools)
    try:
        return list(tokenizer.encode(request.prompt, add_special_tokens=True))
    except Exception as exc:
        raise EngineError(f"could not tokenise the prompt: {exc}") from exc


def prompt_param(request: GenerationRequest) -> str:
    """The request field a prompt-related 400 names: ``prompt`` for a raw prompt."""
    return "messages" if request.prompt is None else "prompt"


# vLLM's OpenAI server bounds ``seed`` to torch.long (int64); a larger seed reaches
# ``torch.Generator.manual_seed`` in the engine core and fails there, not as a 400.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def check_seed(seed: int | None) -> None:
    """Raises ``InvalidRequestError`` (param ``seed``) for a seed outside int64."""
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidRequestError(f"seed {seed} is outside the signed 64-bit range [{SEED_MIN}, {SEED_MAX}]", param="seed")


class TokenizerThread:
    """One worker thread per engine for chat templating and tokenisation.

    A long prompt takes milliseconds to template and encode, which would stall every stream
    on the replica's event loop. One thread, not a pool: a Hugging Face fast tokenizer is not
    safe to call from several threads at once ("Already borrowed"), which is also why Ray
    Serve LLM gives its tokenizer a single-worker executor.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_signal_lock = threading.Lock()


@contextmanager
def signal_handlers_guarded() -> Iterator[list[int]]:
    """Within this block, ``signal.signal`` called off the main thread is skipped (and the
    signal number recorded in the yielded list) instead of raising ``ValueError``.

    SGLang's ``Engine()`` installs a SIGQUIT handler (its children's "I failed" signal);
    releases before the upstream guard raise "signal only works in main thread" when the
    engine is built in a Serve replica or a worker thread. Ray Serve LLM's SGLang engine skips
    the handler the same way. On the main thread the real ``signal.signal`` runs unchanged.
    The patch is process-wide while the block runs, so blocks are serialised.
    """
    skipped: list[int] = []
    original = signal.signal

    def guarded(signum: int, handler: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return original(signum, handler)
        skipped.append(int(signum))
        log.warning("not installing a handler for signal %s: not on the main thread", signum)
        return signal.getsignal(signum)

    with _signal_lock:
        signal.signal = guarded  # type: ignore[assignment]
        try:
            yield skipped
        finally:
            signal.signal = original  # type: ignore[assignment]


def invalid_request(message: str, *, prompt_param: str = "messages") -> InvalidRequestError:
    """The 400 for an engine's validation message; ``ContextLengthExceededError`` (naming
    ``prompt_param``) when the message says the prompt (plus max_tokens) does not fit."""
    lowered = message.lower()
    if any(phrase in lowered for phrase in _CONTEXT_LENGTH_PHRASES):
        return ContextLengthExceededError(message, param=prompt_param)
    return InvalidRequestError(message)


def has_class_named(exc: BaseException, *names: str) -> bool:
    """Whether ``exc``'s class or a base is called one of ``names``. Matching by name keeps
    the error tables importable (and testable) without the engine library."""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


async def drive_stream(
    open_stream: Callable[[], Awaitable[AsyncIterator[T]]],
    *,
    is_final: Callable[[T], bool],
    abort: Callable[[], Awaitable[None]],
    translate: Callable[[Exception], SLMError],
) -> AsyncIterator[T]:
    """Yield the outputs of one engine stream, until the engine ends it.

    - Exceptions from opening or advancing the engine's stream are raised as
      ``translate(exc)`` (chained); exceptions from the consumer's own code never pass here.
    - If this generator is closed (``aclose()``, ``GeneratorExit``) or cancelled before the
      final output was seen, ``abort()`` runs first, then the engine's stream is closed, and
      the original exception propagates. Abort before close: SGLang forgets a request's
      state when its stream closes, after which its abort is a silent no-op.
    - ``abort`` failures are logged, never raised over the exception in flight.
    """
    stream: AsyncIterator[T] | None = None
    done = False  # the engine finished (or failed): nothing to abort
    exhausted = False
    try:
        try:
            stream = await open_stream()
        except Exception as exc:
            done = True
            raise translate(exc) from exc
        while True:
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                done = exhausted = True
                return
            except Exception as exc:
                done = exhausted = True
                raise translate(exc) from exc
            done = done or is_final(item)
            yield item
    finally:
        if not done:
            try:
                await abort()
            except Exception:  # the consumer's exception matters more than a failed abort
                log.warning("engine abort failed", exc_info=True)
        elif stream is not None and not exhausted:
            # The consumer left right after the final output: let the engine's generator end
            # on its own (both engines return right after it) instead of closing it, which
            # makes vLLM send an abort for a request that already finished.
            with suppress(Exception):  # StopAsyncIteration included
                await anext(stream)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with suppress(Exception):
                await aclose()


async def merge_streams(
    streams: Sequence[AsyncIterator[T]], *, abort_all: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[tuple[int, T]]:
    """``(i, item)`` from several streams as their items arrive (one stream: no tasks).

    The first failure is raised and closes the others; closing or cancelling the merge closes
    every stream (each one's own ``finally`` runs, e.g. ``drive_stream``'s abort) before it
    returns. Items that arrive together go out in stream order.

    The streams still running are each waiting inside their engine's stream in a task, so
    cancelling those tasks reaches the engine's stream before ``drive_stream``'s abort can
    (SGLang then forgets the request, and the abort that follows is a no-op): ``abort_all``
    runs first, while every request is still live."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await _aclose(streams[0])
        return
    pending: dict[asyncio.Future[T], int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}  # type: ignore[arg-type]
    ready: list[tuple[int, asyncio.Future[T]]] = []
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            ready = sorted((pending.pop(f), f) for f in done)  # type: ignore[misc]
            while ready:
                i, future = ready.pop(0)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i  # type: ignore[arg-type]
                yield i, item
    finally:
        if pending and abort_all is not None:
            try:
                await abort_all()
            except Exception:  # the exception in flight matters more than a failed abort
                log.warning("engine abort failed", exc_info=True)
        for future in pending:
            future.cancel()
        # read every outcome (a second failure is dropped: the first is the one raised)
        await asyncio.gather(*pending, *(f for _, f in ready), return_exceptions=True)
        for stream in streams:
            await _aclose(stream)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with suppress(Exception):
            await aclose()


class ChunkAssembler:
    """Builds the chunks of one generation (one choice, ``index``) from the engine's deltas.

    ``delta()`` returns the text chunk to send now (or ``None`` while text is held back);
    ``final()`` returns the remaining chunks, the last one with ``finish_reason`` and
    ``usage``. Logprobs ride with the first chunk that carries text after them, so a step that
    produced tokens but no printable text yet does not lose them.

    ``stops``: stop strings to enforce here too, for engines that may stream the start of a
    stop string before matching it (SGLang). Text from the first stop string on is dropped
    and the finish reason becomes ``"stop"``.
    """

    def __init__(self, stops: Sequence[str] = (), *, index: int = 0) -> None:
        self._stops = StopMatcher(tuple(stops))
        self._pending: list[TokenLogprob] = []
        self._stopped = False
        self.index = index

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> GenerationChunk | None:
        if self._stopped:
            return None
        self._pending.extend(logprobs)
        safe, hit = self._stops.feed(text)
        self._stopped = hit
        return self._text_chunk(safe)

    def close(self, finish_reason: FinishReason, *, matched_stop: str | None = None) -> tuple[list[GenerationChunk], FinishReason]:
        """(the held-back text as chunks, the choice's finish reason); logprobs of tokens
        that never printed text stay in ``pending``. ``matched_stop``: the stop string the
        engine says it matched; a start of it at the end of the held-back text is dropped
        (the engine trimmed the stop string from its output, but may have streamed its first
        characters one step earlier)."""
        chunks: list[GenerationChunk] = []
        if not self._stopped:
            held = self._stops.flush()
            tail = self._text_chunk(_strip_stop_prefix(held, matched_stop) if matched_stop else held)
            if tail is not None:
                chunks.append(tail)
        return chunks, ("stop" if self._stopped else finish_reason)

    def take_pending(self) -> tuple[TokenLogprob, ...]:
        pending = tuple(self._pending)
        self._pending.clear()
        return pending

    def final(self, finish_reason: FinishReason, usage: Usage, *, matched_stop: str | None = None) -> list[GenerationChunk]:
        """The held-back text, then the final chunk (see ``close``)."""
        chunks, reason = self.close(finish_reason, matched_stop=matched_stop)
        chunks.append(GenerationChunk(logprobs=self.take_pending(), finish_reason=reason, usage=usage))
        return chunks

    def _text_chunk(self, text: str) -> GenerationChunk | None:
        if not text:
            return None
        chunk = GenerationChunk(text=text, logprobs=tuple(self._pending), index=self.index)
        self._pending.clear()
        return chunk


class Choices:
    """The ``n`` choices of one request (OpenAI's ``n``), each with its ``ChunkAssembler``.

    Text chunks carry their choice's ``index``; ``finish(index, ...)`` closes one choice
    (its held-back text); once every choice finished, ``final(usage)`` is the one final chunk:
    ``finish_reason`` of choice 0 and, when ``n`` > 1, ``finish_reasons`` by index (the shape
    the fake engine and ``remote_openai`` give). Logprobs of tokens that printed no text (an
    EOS) ride on the final chunk for choice 0, as with one choice; for the other choices they
    are dropped, since a chunk before the final one must carry text.
    """

    def __init__(self, n: int, stops: Sequence[str] = ()) -> None:
        self.n = n
        self._choices = [ChunkAssembler(stops, index=i) for i in range(n)]
        self._reasons: dict[int, FinishReason] = {}

    def delta(self, index: int, text: str, logprobs: Sequence[TokenLogprob] = ()) -> list[GenerationChunk]:
        if index in self._reasons:
            return []
        chunk = self._choice(index).delta(text, logprobs)
        return [chunk] if chunk is not None else []

    def finish(self, index: int, reason: FinishReason, *, matched_stop: str | None = None) -> list[GenerationChunk]:
        if index in self._reasons:
            return []
        chunks, self._reasons[index] = self._choice(index).close(reason, matched_stop=matched_stop)
        return chunks

    def finished(self, index: int) -> bool:
        return index in self._reasons

    @property
    def done(self) -> bool:
        return len(self._reasons) == self.n

    def reason(self, index: int) -> FinishReason | None:
        return self._reasons.get(index)

    def set_reason(self, index: int, reason: FinishReason) -> None:
        """Overrides a finished choice's reason (``tool_calls`` once a parser found a call)."""
        self._reasons[index] = reason

    def final(self, usage: Usage) -> GenerationChunk:
        reasons = tuple(self._reasons[i] for i in range(self.n))
        return GenerationChunk(logprobs=self._choices[0].take_pending(), finish_reason=reasons[0], usage=usage,
                               finish_reasons=reasons if self.n > 1 else ())

    def _choice(self, index: int) -> ChunkAssembler:
        if not 0 <= index < self.n:
            raise EngineError(f"the engine sent choice {index} of a request for {self.n}")
        return self._choices[index]


def _strip_stop_prefix(text: str, stop: str) -> str:
    """``text`` without its longest suffix that is a (proper or full) prefix of ``stop``."""
    for size in range(min(len(text), len(stop)), 0, -1):
        if text.endswith(stop[:size]):
            return text[:-size]
    return text
