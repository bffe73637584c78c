"""The gateway's endpoints beside chat: ``POST /v1/embeddings`` and ``POST /v1/completions``
(docs/endpoints.md), as functions of the ``Gateway`` whose thin methods Serve's ingress
routes to them; and ``send_answer``, how chat and completion answers leave. They share the chat path's auth, key limits, data policy, routing, splits,
audit trail and metrics through the gateway's own members.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster import policy, strategy, traffic
from cluster.errors import EngineTimeoutError
from cluster.openai_endpoints import (
    EMBEDDER_ID,
    embedding_body,
    parse_completion_request,
    parse_embedding_request,
    raw_prompt_decision,
    to_completion_request,
)
from cluster.routing import AUTO, apply_split
from cluster.types import ChatMessage, GenerationRequest, RouteDecision, SamplingParams
from deployments.gateway.edge import clean_request_id, read_body
from deployments.gateway.endpoints import collect_text_completion, text_sse_events
from deployments.gateway.ensemble import Outcome, with_id
from deployments.gateway.errors import CLIENT_CLOSED, error_response, to_slm_error
from deployments.gateway.faults import retry_after_headers
from deployments.gateway.metrics import finish_after
from deployments.gateway.responses import anext_or_close
from deployments.gateway.streams import within

if TYPE_CHECKING:
    from deployments.gateway.ingress import Gateway

log = logging.getLogger("ray.serve")


async def embeddings(gw: "Gateway", request: Request) -> Response:
    """``router-embedder``: the stock all-MiniLM-L6-v2 that the router deployment holds
    beside its tuned copy. A limited key is admitted (its request rate counts) and its
    token reservation given back: embeddings are not billed."""
    ticket = None
    headers: dict[str, str] = {}
    try:
        caller = await gw._check_auth(request)
        limits = gw.config.gateway
        job = parse_embedding_request(await read_body(request, limits.max_request_bytes, limits.body_timeout_s), gw.config)
        declared = policy.parse_data_class(request.headers.get(policy.DATA_CLASS_HEADER), gw.config.policy)
        gw.keys.check_scope(caller, model=EMBEDDER_ID, strategy="route", data_class=declared)  # on-prem: no PII screen
        as_chat = GenerationRequest("embed", tuple(ChatMessage("user", t) for t in job.texts), SamplingParams(max_tokens=1))
        ticket = await gw.keys.admit(caller, as_chat, headers)
        result = await within(gw.router.embed.remote(list(job.texts)), limits.request_timeout_s)
        body = embedding_body(result["embeddings"].tolist(), result["prompt_tokens"], job.encoding_format)
        return JSONResponse(body, headers=headers)
    except asyncio.TimeoutError:
        return error_response(to_slm_error(EngineTimeoutError("The embedder did not answer in time.")), headers=headers)
    except Exception as exc:  # noqa: BLE001 - mapped to a typed error in one place
        return error_response(to_slm_error(exc), headers=headers)
    finally:
        gw.keys.settle_soon(ticket)


async def text_completions(gw: "Gateway", request: Request) -> Response:
    """Legacy text completions: a raw prompt to a named model (or ``auto``, routed on the
    prompt) whose engine takes raw prompts; strategy ``route`` only (no cascade, race or
    escalation). Auth, key scope and limits, the data policy, traffic splits, the audit
    line and the gateway metrics are as for chat."""
    started_at = gw.clock()
    request_id = clean_request_id(request.headers.get("x-request-id"))
    headers: dict[str, str] = {"x-slm-strategy": "route"}
    decision: RouteDecision | None = None
    ticket = None
    trail = gw.audit.start(request_id, request.headers.get("authorization"), started_at)
    trail.strategy = "route"
    try:
        caller = await gw._check_auth(request)
        limits = gw.config.gateway
        wire = parse_completion_request(await read_body(request, limits.max_request_bytes, limits.body_timeout_s))
        trail.requested_model, trail.stream = wire.model, wire.stream
        gen = to_completion_request(wire, limits, request_id)
        # for screening, routing, limits and the audit line's text
        as_chat = trail.gen = dataclasses.replace(gen, messages=(ChatMessage("user", gen.prompt or ""),))
        declared = policy.parse_data_class(request.headers.get(policy.DATA_CLASS_HEADER), gw.config.policy)
        screened = trail.screened = policy.screen(as_chat.messages, declared, gw.config.policy)
        headers["x-slm-data-class"] = screened.data_class
        if screened.pii_types:
            headers["x-slm-pii"] = ",".join(screened.pii_types)
        gw.keys.check_scope(caller, model=wire.model, strategy="route", data_class=screened.data_class)
        auto = wire.model == AUTO
        gw.splits.ensure_started()
        routed = await gw._decide(wire.model, as_chat)
        snap = gw.splits.snapshot
        key = traffic.request_key(wire.user, request.headers.get(traffic.SESSION_HEADER))
        routed = apply_split(gw.config, routed, snap.splits, snap.current, key)
        decision = gw._reachable(raw_prompt_decision(gw.config, routed, auto=auto), auto, screened)
        plan = gw.keys.trim_plan(caller, strategy.Plan("route", (decision,)), decision)
        ticket = await gw.keys.admit(caller, as_chat, headers)

        def call_request(d: RouteDecision) -> GenerationRequest:
            req = dataclasses.replace(gen, whole_answer=not wire.stream)  # no gate reads it early: engines may fetch it whole
            if policy.is_external(gw.config, d.model, d.version) and screened.external_messages is not None:
                req = dataclasses.replace(req, prompt=screened.external_messages[0].content)  # redacted under pii: redact
            return with_id(req, d, logprobs=False)

        out = trail.out = await gw.ensemble.run(plan, call_request, stream=wire.stream, started_at=started_at)
        trail.first = first = decision
        decision = out.winner.decision
        headers.update(gw._headers(decision))
        meta = {"id": f"cmpl-{request_id}", "created": int(time.time()), "model": decision.served_name}
        return await send_answer(gw, out, wire.stream, wire.stream_options, gen, meta, headers, trail, ticket, "route", first, snap,
                                 started_at, text_sse_events, collect_text_completion)
    except asyncio.CancelledError:
        client_left(gw, trail, ticket, decision, decision)
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to a typed error in one place
        return send_error(gw, exc, trail, ticket, headers, decision, decision, "route", started_at, f"completions {request_id}")


def client_left(gw: "Gateway", trail: Any, ticket: Any, decision: RouteDecision | None, first: RouteDecision | None) -> None:
    """The client left (Serve cancels the handler): no response goes out, but the request
    still gets its audit line (nginx's 499, "client closed request"), and a request that
    did not finish is not billed."""
    trail.first, trail.decision = first, decision
    gw.audit.finish(trail, CLIENT_CLOSED, "client_disconnected")
    gw.keys.settle_soon(ticket)


def send_error(
    gw: "Gateway", exc: Exception, trail: Any, ticket: Any, headers: dict[str, str], decision: RouteDecision | None,
    first: RouteDecision | None, strategy_name: str | None, started_at: float, what: str,
) -> Response:
    """A failed chat or completion request: its typed error as an OpenAI body with the route
    headers known so far, its audit line and metrics, and its key reservation given back."""
    err = to_slm_error(exc)
    log.info("gateway: %s -> %s %s", what, err.http_status, err.code)
    trail.first, trail.decision = first, decision
    gw.audit.finish(trail, err.http_status, err.code)
    gw.keys.settle_soon(ticket)
    gw.metrics.request_done(started_at=started_at, status=err.http_status, strategy=strategy_name, decision=decision, first=first,
                            snapshot=gw.splits.snapshot)
    return error_response(err, headers={**headers, **gw._headers(decision, first), **retry_after_headers(err)})


async def send_answer(
    gw: "Gateway", out: Outcome, stream: bool, stream_options: Any, gen: GenerationRequest, meta: dict[str, Any], headers: dict[str, str],
    trail: Any, ticket: Any, strategy_name: str, first: RouteDecision | None, snap: Any, started_at: float,
    stream_events: Any, collect: Any,
) -> Response:
    """How an answer leaves, for chat and legacy completions alike (``stream_events`` and
    ``collect`` shape it): an SSE stream, or one JSON body with the cost headers. Either
    way the key's reservation is settled and the audit line and metrics are written, a
    stream's when it ends."""
    decision = out.winner.decision
    chunks = out.winner.replay()
    if stream:
        include_usage = bool(stream_options and stream_options.include_usage)
        # Pull the first chunk before answering, so failures before any token get
        # a real status code instead of a 200 stream with an error in it.
        first_chunk = await anext_or_close(chunks)
        events = stream_events(first_chunk, chunks, meta, include_usage=include_usage, logprobs=gen.sampling.logprobs,
                               trailer=lambda: gw._cost(out))
        first_token_at = gw.clock()  # a held-back answer's first token leaves now, after the gate
        events = finish_after(events, lambda: gw.metrics.request_done(
            started_at=started_at, status=200, strategy=strategy_name, decision=decision, first=first, out=out,
            first_token_at=first_token_at, snapshot=snap))
        events = gw.keys.settled_stream(events, ticket, out)
        return StreamingResponse(gw.audit.stream(trail, events), media_type="text/event-stream", headers=headers)
    body = await collect(chunks, meta, logprobs=gen.sampling.logprobs)
    headers.update(gw._cost(out))
    await gw.keys.settle(ticket, out)
    gw.audit.finish(trail, 200)
    gw.metrics.request_done(started_at=started_at, status=200, strategy=strategy_name, decision=decision, first=first, out=out,
                              snapshot=snap)
    return JSONResponse(body, headers=headers)
