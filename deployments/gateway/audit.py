"""The gateway's audit trail: one line per chat request, written off the request path.

``AuditTrail.start`` opens a ``Draft`` at the top of a request; the handler fills it in as
the facts become known, and ``finish`` (or, for a stream, the end of ``stream``) builds
the line with ``cluster.audit.build_record`` and hands it to every sink's bounded queue.
That is all a request ever does: ``finish`` never awaits and never raises. A full queue
drops the line and counts it; a background task per sink drains its queue into

- ``FileSink``: a rotating JSONL file (the standard library's ``RotatingFileHandler``,
  written from a worker thread), and
- ``RedisStreamSink``: ``XADD <prefix>:<stream> MAXLEN ~ n`` when Redis is configured.

A sink that fails or takes longer than ``audit.sink_timeout_s`` counts the lines as
``failed``; ``status()`` (``GET /v1/slm/audit``) reports written, dropped and failed per sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping, Protocol

from cluster import audit, costing
from cluster.config import AuditConfig, ClusterConfig
from cluster.policy import Screened
from cluster.types import GenerationRequest, RouteDecision
from deployments.gateway.ensemble import Outcome

log = logging.getLogger("ray.serve")

BATCH = 256  # most lines one sink write takes
# A worker waits this long after a line before writing, so that under load one write (a
# thread hop for the file, a round trip for Redis) takes many lines, not one each.
GATHER_S = 0.05


class Sink(Protocol):
    name: str

    async def write(self, lines: list[str]) -> None: ...

    async def close(self) -> None: ...


class _RaisingRotatingHandler(logging.handlers.RotatingFileHandler):
    # logging swallows write errors (handleError prints them); the sink must count them.
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        raise


class FileSink:
    """JSON lines appended to ``path``, rotated at ``max_bytes`` into ``path.1`` ...
    ``path.<backup_count>``. The folder is made on the first write; a path that cannot be
    written fails each write (counted by the worker), never the gateway's start."""

    name = "file"

    def __init__(self, path: str, max_bytes: int, backup_count: int) -> None:
        self.path = audit.expand(path)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self._handler: _RaisingRotatingHandler | None = None
        self._size = 0  # characters in the current file, counted as the standard handler counts them

    def _write(self, lines: list[str]) -> None:
        # The handler's rotation (doRollover) and opening, with the size kept here: its own
        # per-record path (a log record, a lock, a seek to the end and a flush per line) cost
        # more CPU than the rest of the audit line together.
        handler = self._handler
        if handler is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = self._handler = _RaisingRotatingHandler(
                self.path, maxBytes=self.max_bytes, backupCount=self.backup_count, encoding="utf-8", delay=True
            )
        if handler.stream is None:
            handler.stream = handler._open()
            self._size = handler.stream.seek(0, 2)
        for line in lines:
            data = line + "\n"
            if self.max_bytes > 0 and self._size and self._size + len(data) >= self.max_bytes:
                handler.doRollover()  # renames path -> path.1 ...; the delayed handler reopens nothing
                handler.stream = handler._open()
                self._size = 0
            handler.stream.write(data)
            self._size += len(data)
        handler.stream.flush()

    async def write(self, lines: list[str]) -> None:
        await asyncio.to_thread(self._write, lines)

    async def close(self) -> None:
        if self._handler is not None:
            await asyncio.to_thread(self._handler.close)


class RedisStreamSink:
    """Each line as the ``json`` field of one stream entry, the stream capped near ``maxlen``."""

    name = "redis"

    def __init__(self, url: str, key: str, maxlen: int, *, password: str | None, timeout_s: float) -> None:
        import redis.asyncio as aioredis

        self._client: Any = aioredis.from_url(url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.key = key
        self.maxlen = maxlen

    async def write(self, lines: list[str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(self.key, {"json": line}, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()


class SinkWorker:
    """One sink's bounded queue and the background task that drains it."""

    def __init__(self, sink: Sink, queue_size: int, timeout_s: float) -> None:
        self.sink = sink
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.written = self.dropped = self.failed = 0
        self.last_error: str | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._task: asyncio.Task | None = None

    def put(self, line: str) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(self.queue_size)
            self._task = asyncio.get_running_loop().create_task(self._drain())
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1

    def _take(self, first: str) -> list[str]:
        assert self._queue is not None
        batch = [first]
        while len(batch) < BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _write(self, batch: list[str]) -> None:
        try:
            await asyncio.wait_for(self.sink.write(batch), self.timeout_s)
            self.written += len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a sink's failure is counted, never raised
            if self.failed == 0 or self.last_error is None:
                log.warning("gateway: audit sink %s failed (%s: %s); counting failures", self.sink.name, type(exc).__name__, exc)
            self.failed += len(batch)
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    async def _drain(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            await asyncio.sleep(GATHER_S)
            await self._write(self._take(first))

    async def close(self) -> None:
        """Stop the task, give what is queued one last bounded write, close the sink."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        while self._queue is not None and not self._queue.empty():
            await self._write(self._take(self._queue.get_nowait()))
        with contextlib.suppress(Exception):
            await self.sink.close()

    def status(self) -> dict[str, Any]:
        queued = self._queue.qsize() if self._queue is not None else 0
        return {"written": self.written, "dropped": self.dropped, "failed": self.failed, "queued": queued, "last_error": self.last_error}


@dataclass
class Draft:
    """What one request's line will say, filled in as the handler learns it."""

    request_id: str
    started_at: float  # the gateway's monotonic clock
    wall_time: float
    authorization: str | None
    requested_model: str | None = None
    stream: bool = False
    strategy: str | None = None
    screened: Screened | None = None
    gen: GenerationRequest | None = None
    first: RouteDecision | None = None  # the router's view
    decision: RouteDecision | None = None  # who answers (set from out when there is one)
    out: Outcome | None = None
    finished: bool = False


class AuditTrail:
    def __init__(self, cfg: ClusterConfig, sinks: list[Sink], clock: Callable[[], float], wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.acfg: AuditConfig = cfg.audit
        self.clock = clock
        self.wall = wall
        self.workers = [SinkWorker(s, self.acfg.queue_size, self.acfg.sink_timeout_s) for s in sinks] if self.acfg.enabled else []
        self.build_errors = 0

    @classmethod
    def from_config(cls, cfg: ClusterConfig, env: Mapping[str, str], clock: Callable[[], float]) -> "AuditTrail":
        a = cfg.audit
        sinks: list[Sink] = []
        if a.enabled:
            sinks.append(FileSink(a.path, a.max_bytes, a.backup_count))
            url = cfg.redis.resolved_url(env)
            if url is not None:
                r = cfg.redis
                sinks.append(RedisStreamSink(url, f"{r.key_prefix}:{a.redis_stream}", a.redis_maxlen, password=r.password(env),
                                             timeout_s=r.timeout_s))
        return cls(cfg, sinks, clock)

    def start(self, request_id: str, authorization: str | None, started_at: float) -> Draft:
        return Draft(request_id, started_at, self.wall(), authorization)

    def finish(self, draft: Draft, status: int, error_code: str | None = None) -> None:
        """Queue the request's line. Never raises, never waits; once per draft."""
        if not self.workers or draft.finished:
            return
        draft.finished = True
        try:
            line = audit.dumps(self.record(draft, status, error_code))
        except Exception:  # noqa: BLE001 - our bug, but the answer must still go out
            self.build_errors += 1
            log.exception("gateway: building the audit line of %s failed", draft.request_id)
            return
        for worker in self.workers:
            worker.put(line)

    def record(self, d: Draft, status: int, error_code: str | None) -> dict[str, Any]:
        out = d.out
        decision = out.winner.decision if out is not None else d.decision
        routed = d.first or decision
        route = None
        if decision is not None:
            route = audit.RouteLine(decision.model, decision.version, decision.reason,
                                    routed.domain if routed else None, routed.escalation_score if routed else None)
        calls: list[audit.CallLine] = []
        spent, alone = costing.ZERO, None
        ttft_ms = None
        if out is not None:
            bill = out.bill(self.cfg)
            for call, rec in zip(out.calls, bill.records):
                model = self.cfg.model(rec.model)
                ttft = (call.first_at - call.started_at) * 1000 if call.first_at is not None else None
                calls.append(audit.CallLine(call.name, rec.model, rec.version, model.role if model else None, rec.prompt_tokens,
                                            rec.completion_tokens, rec.latency_s * 1000, ttft, audit.call_outcome(rec.outcome)))
            spent, alone = bill.spent, bill.alone
            if out.winner.first_at is not None:
                ttft_ms = (out.winner.first_at - d.started_at) * 1000
        include = self.acfg.include_text
        return audit.build_record(
            request_id=d.request_id, wall_time=d.wall_time, api_key=d.authorization, requested_model=d.requested_model,
            strategy=out.strategy if out is not None else d.strategy, route=route, calls=calls,
            gate_scores=[out.gate_score] if out is not None and out.gate_score is not None else [],
            escalated=out.escalated if out is not None else None, race_winner=out.race_winner if out is not None else None,
            data_class=d.screened.data_class if d.screened else None, pii_types=d.screened.pii_types if d.screened else (),
            cost_usd=spent.usd, energy_j=spent.joules, frontier_cost_usd=alone.usd if alone is not None else None,
            status=status, error_code=error_code, stream=d.stream, latency_ms=(self.clock() - d.started_at) * 1000, ttft_ms=ttft_ms,
            include_text=include,
            prompt="\n".join(f"{m.role}: {m.content}" for m in d.gen.messages) if include and d.gen else None,
            answer="".join(c.text for c in out.winner.buffer) if include and out is not None else None,
        )

    async def stream(self, draft: Draft, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events`` passed through; the line is queued when the stream ends. The status
        is the 200 already sent; an error event, or a client that left before ``[DONE]``,
        sets ``error_code``."""
        error: str | None = None
        done = False
        try:
            async for event in events:
                if event.startswith('data: {"error"'):
                    with contextlib.suppress(Exception):
                        error = json.loads(event[6:])["error"].get("code") or "stream_error"
                    error = error or "stream_error"
                elif event.startswith("data: [DONE]"):
                    done = True
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined] - cancels the model call when the client left
            if not done and error is None:
                error = "client_disconnected"
            self.finish(draft, 200, error)

    def status(self) -> dict[str, Any]:
        a = self.acfg
        return {
            "enabled": a.enabled,
            "path": str(audit.expand(a.path)),
            "include_text": a.include_text,
            "build_errors": self.build_errors,
            "sinks": {w.sink.name: w.status() for w in self.workers},
        }

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()
