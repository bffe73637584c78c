"""The Gateway ingress: OpenAI-compatible HTTP in front of the router and the model servers.

``POST /v1/chat/completions`` (streamed and not), ``GET /v1/models``, ``/healthz`` and
``/readyz``. Every answer names the model version that served it and the route reason,
in the ``x-slm-*`` headers and the body's ``model`` field (``code@v1``).
"""


import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster import capabilities, policy, strategy, traffic
from cluster.chat import route_query, to_generation_request
from cluster.config import ClusterConfig
from cluster.errors import SLMError
from cluster.keys import KeyRecord
from cluster.openai_endpoints import (
    find_model,
    model_objects,
    models_list,
)
from cluster.openai_schema import ChatCompletionRequest, parse_chat_request
from cluster.routing import AUTO, COLD_REASON, apply_split, cover_cold, decide_auto, listed_models, resolve_explicit, route_capable
from cluster.types import GenerationRequest, RouteDecision, deployment_name
from deployments.gateway.audit import AuditTrail
from deployments.gateway.auth import KeyGuard
from deployments.gateway.edge import (
    CHAT_OPENAPI,
    CHAT_RESPONSES,
    ERRORS,
    clean_request_id,
    install_error_handlers,
    read_body,
)
from deployments.gateway.ensemble import Ensemble, Outcome, with_id
from deployments.gateway import handlers
from deployments.gateway.errors import error_response
from deployments.gateway.responses import collect_completion, sse_events
from deployments.gateway.figures import FigureRecorder
from deployments.gateway.metrics import GatewayMetrics
from deployments.gateway.shadow import ShadowSender
from deployments.gateway.splits import SplitCache
from deployments.gateway.streams import handle_stream, timed_chunks, within
from deployments.gateway.warmth import ReplicaCounts, Warmth, serve_replica_counts
from deployments.in_gateway import in_gateway_models

log = logging.getLogger("ray.serve")

api = FastAPI(title="slm-cluster gateway", docs_url=None, redoc_url=None)  # /openapi.json stays
install_error_handlers(api)  # before @serve.ingress, which freezes a copy of the app


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests): no application
        return ""


@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        config: ClusterConfig,
        router: DeploymentHandle,
        models: dict[str, DeploymentHandle],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.models = models
        self.in_gateway = in_gateway_models(config)  # runs_in: gateway: called without a Serve hop
        # Versions whose engine fetches a whole answer in one piece (GenerationRequest.whole_answer):
        # only their first chunk may come with the last; the others keep the first-token limit.
        self.fetch_whole = {deployment_name(m.name, v.name) for m, v in config.deployments() if capabilities.fetches_whole(v.engine)}
        self.clock = time.monotonic
        env = env if env is not None else os.environ
        self.keys = self._load_api_keys(env)
        self.model_ids = listed_models(config)
        store = self._traffic_store(env)
        self.figures = FigureRecorder(store)
        self.ensemble = Ensemble(config, self._open_call, self.clock, self.figures)
        self.splits = SplitCache(store, config.redis.poll_interval_s, self.clock)
        self.shadows = ShadowSender(config, self.ensemble)
        # Serve's controller's view of the replicas, read off the request path (/readyz).
        self.replica_counts: ReplicaCounts = serve_replica_counts(_app_name())
        self.gpu_ids: dict[str, list[str]] = {}
        self.warmth = self._warmth()
        self.audit = AuditTrail.from_config(config, env, self.clock)
        self.metrics = GatewayMetrics(config, self.clock)

    def _warmth(self) -> Warmth:
        """Watches the deployments that may scale to zero (none: no poller runs)."""
        watched = {}
        for model, version in self.config.model_deployments():
            auto = version.autoscaling
            if auto.min_replicas == 0:
                initial = auto.min_replicas if auto.initial_replicas is None else auto.initial_replicas
                watched[deployment_name(model.name, version.name)] = initial == 0
        return Warmth(watched, self.models, self.replica_counts)

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica: the background pollers and warm-ups
        end with it rather than outliving it (no untracked background tasks); the audit
        writers get one last bounded write of what they hold."""
        await self.warmth.close()
        await self.splits.close()
        await self.audit.close()
        await self.keys.close()
        await self.metrics.close()
        for model in self.in_gateway.values():
            await model.shutdown()

    def _traffic_store(self, env: Mapping[str, str]):  # type: ignore[no-untyped-def]
        """The Redis traffic store when the config names one (``slmctl up`` names the
        embedded one it starts); without one, every model serves its current version."""
        url = self.config.redis.resolved_url(env)
        if url is None:
            return None
        from cluster.traffic_store import RedisTrafficStore

        r = self.config.redis
        return RedisTrafficStore(url, prefix=r.key_prefix, password=r.password(env), timeout_s=r.timeout_s)

    def _open_call(self, decision: RouteDecision, request: GenerationRequest):  # type: ignore[no-untyped-def]
        name = decision.deployment_name
        whole = request.whole_answer and name in self.fetch_whole
        local = self.in_gateway.get(name)
        if local is not None:
            return timed_chunks(lambda: local.stream(request), self.config.gateway, self.clock, whole)
        return timed_chunks(lambda: handle_stream(self.models[name], request), self.config.gateway, self.clock, whole)

    def _load_api_keys(self, env: Mapping[str, str]) -> KeyGuard:
        """The env-var keys, and the managed ones in Redis with ``gateway.keys.managed``
        (``deployments/gateway/auth.py``); refuses to start when keys are asked for but absent."""
        return KeyGuard(self.config, env, self.clock)

    # --- request plumbing -------------------------------------------------------------

    async def _check_auth(self, request: "Request") -> KeyRecord | None:
        """The caller's managed key (its scope and limits), None when unscoped; 401 otherwise."""
        return await self.keys.authenticate(request.headers.get("authorization"))

    async def _read(self, request: Request) -> ChatCompletionRequest:
        gw = self.config.gateway
        return parse_chat_request(await read_body(request, gw.max_request_bytes, gw.body_timeout_s))

    async def _decide(self, requested: str, gen: GenerationRequest) -> RouteDecision:
        if requested != AUTO:
            return resolve_explicit(self.config, requested)
        timeout = self.config.router.request_timeout_s
        try:
            scores = await within(self.router.route.remote(route_query(gen)), timeout)
        except Exception as exc:  # noqa: BLE001 - the router is an optimisation, not a dependency
            log.warning("gateway: router failed (%s); sending auto to the general model", type(exc).__name__)
            general = self.config.general
            return RouteDecision(model=general.name, version=general.current.name, reason="general:router-unavailable")
        return decide_auto(self.config, scores)

    def _reachable(self, decision: RouteDecision, auto: bool, screened: policy.Screened) -> RouteDecision:
        """The first choice, checked against the data policy: a named model the data may not
        reach is a 403; an auto pick falls back to the general model."""
        if policy.allowed(self.config, screened, decision.model, decision.version):
            return decision
        general = self.config.general
        if auto and policy.allowed(self.config, screened, general.name, general.current.name):
            return RouteDecision(model=general.name, version=general.current.name, reason="general:data-policy", domain=decision.domain)
        policy.check_named(self.config, screened, decision.model, decision.version)
        return decision  # unreachable: check_named raised

    @staticmethod
    def _headers(decision: RouteDecision | None, first: RouteDecision | None = None) -> dict[str, str]:
        # Serve's proxy already echoes x-request-id; it is the id used here too.
        headers: dict[str, str] = {}
        if decision is not None:
            headers.update(
                {"x-slm-model": decision.model, "x-slm-version": decision.version, "x-slm-route-reason": decision.reason}
            )
            routed = first or decision  # the router's view, whoever answered
            if routed.domain is not None:
                headers["x-slm-domain"] = routed.domain
            if routed.escalation_score is not None:
                headers["x-slm-escalation-score"] = f"{routed.escalation_score:.4f}"
            if routed.escalation_threshold is not None:
                headers["x-slm-escalation-threshold"] = f"{routed.escalation_threshold:.4f}"
        return headers

    @staticmethod
    def _outcome_headers(out: Outcome) -> dict[str, str]:
        headers = {"x-slm-strategy": out.strategy, "x-slm-escalated": out.escalated}
        if out.gate_score is not None:
            headers["x-slm-gate-score"] = f"{out.gate_score:.4f}"
        if out.race_winner is not None:
            headers["x-slm-race-winner"] = out.race_winner
        if out.decided_ms is not None:
            headers["x-slm-decided-ms"] = f"{out.decided_ms:.1f}"
        if out.cancelled:
            headers["x-slm-cancelled"] = ",".join(out.cancelled)
        return headers

    def _cost(self, out: Outcome) -> dict[str, str]:
        """Every call counts, cancelled ones included; and what the frontier alone would
        have cost: its input tokens (this request's, as the answering engine counted them
        when the frontier did not run) and this answer's output tokens, at its prices
        (``costing.bill``, which the audit line reports too)."""
        bill = out.bill(self.config)
        spent, alone = bill.spent, bill.alone
        headers = {"x-slm-cost-usd": format(spent.usd, ".8g"), "x-slm-energy-j": format(spent.joules, ".8g")}
        if alone is not None:
            headers["x-slm-frontier-cost-usd"] = format(alone.usd, ".8g")
        return headers

    # --- endpoints --------------------------------------------------------------------

    @api.post("/v1/chat/completions", openapi_extra=CHAT_OPENAPI, responses=CHAT_RESPONSES)
    async def chat_completions(self, request: Request) -> Response:
        started_at = self.clock()
        request_id = clean_request_id(request.headers.get("x-request-id"))
        decision: RouteDecision | None = None
        first: RouteDecision | None = None
        headers: dict[str, str] = {}
        ticket = None  # a limited key's reservation, settled once whatever happens
        trail = self.audit.start(request_id, request.headers.get("authorization"), started_at)  # its line goes out at the end
        try:
            caller = await self._check_auth(request)
            wire = await self._read(request)
            trail.requested_model, trail.stream = wire.model, wire.stream
            gen = trail.gen = to_generation_request(wire, self.config.gateway, request_id)
            chosen = strategy.parse_strategy(request.headers.get(strategy.STRATEGY_HEADER), self.config.strategy)
            budget = strategy.parse_budget(request.headers.get(strategy.BUDGET_HEADER))
            declared = policy.parse_data_class(request.headers.get(policy.DATA_CLASS_HEADER), self.config.policy)
            # The PII screen runs before routing; the router is on-prem and sees the text.
            screened = trail.screened = policy.screen(gen.messages, declared, self.config.policy)
            trail.strategy = headers["x-slm-strategy"] = chosen
            headers["x-slm-data-class"] = screened.data_class
            if screened.pii_types:
                headers["x-slm-pii"] = ",".join(screened.pii_types)
            self.keys.check_scope(caller, model=wire.model, strategy=chosen, data_class=screened.data_class)
            auto = wire.model == AUTO
            self.splits.ensure_started()
            self.figures.ensure_started()
            routed = await self._decide(wire.model, gen)
            snap = self.splits.snapshot  # from memory: the store is never on a request's path
            key = traffic.request_key(wire.user, request.headers.get(traffic.SESSION_HEADER))
            routed = apply_split(self.config, routed, snap.splits, snap.current, key)
            self.warmth.ensure_started()
            covered = cover_cold(self.config, routed, self.warmth.cold)  # from memory, like the split
            if covered.reason == COLD_REASON:
                self.warmth.warm_up(routed.deployment_name)
                routed = apply_split(self.config, covered, snap.splits, snap.current, key)
            needed = capabilities.requested(gen.sampling)  # tools, n, penalties...: only engines that honour them
            routed = route_capable(self.config, routed, needed, auto=auto,
                                   split=lambda d: apply_split(self.config, d, snap.splits, snap.current, key))
            first = decision = self._reachable(routed, auto, screened)
            capabilities.check_decision(self.config, decision, needed)  # a data-policy fallback must honour them too
            plan = strategy.plan(
                self.config, chosen, decision, auto=auto, screened=screened, budget_ms=budget, expected_ms=self.ensemble.expected_ms(),
                frontier_blocked_s=self.ensemble.frontier_blocked_s(), needed=needed,
            )
            plan = self.keys.trim_plan(caller, plan, decision)  # no escalation past the key's scope
            ticket = await self.keys.admit(caller, gen, headers)  # 429 here; x-ratelimit-* into headers either way
            gated = plan.strategy in ("cascade", "race")
            # a plain route answered in one piece: engines may fetch it whole (remote_openai: one JSON body)
            whole = dataclasses.replace(gen, whole_answer=True) if not wire.stream and not gated else gen

            def call_request(d: RouteDecision) -> GenerationRequest:
                req = whole
                if policy.is_external(self.config, d.model, d.version) and screened.external_messages is not None:
                    req = dataclasses.replace(req, messages=screened.external_messages)
                return with_id(req, d, logprobs=gated)

            out = trail.out = await self.ensemble.run(plan, call_request, stream=wire.stream, started_at=started_at)
            trail.first = first
            shadow = self.shadows.target(snap, first)
            if shadow is not None and policy.allowed(self.config, screened, shadow.model, shadow.version):
                # after the user's own calls have started: fire and forget, answer dropped
                # streamed, as the candidate's figures (TTFT) are read against the stable version's
                self.shadows.send(shadow, lambda d: with_id(
                    dataclasses.replace(call_request(d), request_id=f"{request_id}:shadow", whole_answer=False), d, logprobs=True))
            decision = out.winner.decision
            headers.update(self._headers(decision, first))
            headers.update(self._outcome_headers(out))
            meta = {"id": f"chatcmpl-{request_id}", "created": int(time.time()), "model": decision.served_name}
            return await handlers.send_answer(self, out, wire.stream, wire.stream_options, gen, meta, headers, trail, ticket, chosen, first,
                                              snap, started_at, sse_events, collect_completion)
        except asyncio.CancelledError:
            handlers.client_left(self, trail, ticket, decision, first)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a typed error in one place
            return handlers.send_error(self, exc, trail, ticket, headers, decision, first, headers.get("x-slm-strategy"), started_at,
                                       request_id)

    @api.get("/v1/models", responses=ERRORS)
    async def list_models(self, request: Request) -> Response:
        """Every id this gateway answers to, with description, role, domains and owner."""
        try:
            await self._check_auth(request)
        except SLMError as err:
            return error_response(err)
        return JSONResponse(models_list(model_objects(self.config, created=0)))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/slm/traffic")
    async def traffic_status(self, request: Request) -> Response:
        """This gateway's view of the traffic splits and of the store (for `slmctl status`)."""
        try:
            self.keys.check_admin(await self._check_auth(request))
        except SLMError as err:
            return error_response(err)
        self.splits.ensure_started()
        shadow = {"sent": self.shadows.sent, "skipped": self.shadows.skipped, "active": self.shadows.active}
        return JSONResponse({**self.splits.status(), "shadow_calls": shadow, "warmth": self.warmth.status()})

    @api.get("/v1/slm/audit")
    async def audit_status(self, request: Request) -> Response:
        """This gateway's audit sinks: lines written, dropped (queue full) and failed, per sink."""
        try:
            self.keys.check_admin(await self._check_auth(request))
        except SLMError as err:
            return error_response(err)
        return JSONResponse(self.audit.status())

    @api.get("/readyz", responses=ERRORS)
    async def readyz(self) -> Response:
        """Ready when every model deployment has a running replica (or is scaled to zero on
        purpose), as Serve's controller counts them: never through the request queues, so
        a loaded gateway stays ready. GPU ids are asked once per deployment, for show."""
        self.warmth.ensure_started()
        try:
            counts = await asyncio.wait_for(self.replica_counts(), 5.0)
        except Exception as exc:  # noqa: BLE001 - the controller is unreachable: not ready
            log.warning("gateway: /readyz cannot read replica counts (%s)", type(exc).__name__)
            counts = None
        results = []
        for name in self.models:
            running = None if counts is None else counts.get(name, 0)
            entry: dict[str, Any] = {"deployment": name, "ready": bool(running) or name in self.warmth.cold, "replicas": running}
            if running and name not in self.gpu_ids:
                await self._learn_gpu_ids(name)
            if name in self.gpu_ids:
                entry["gpu_ids"] = self.gpu_ids[name]
            results.append(entry)
        # runs_in: gateway: served by this replica itself, which is answering
        results += [{"deployment": name, "ready": True, "runs_in": "gateway"} for name in self.in_gateway]
        ok = counts is not None and all(r["ready"] for r in results)
        return JSONResponse({"ready": ok, "deployments": results}, status_code=200 if ok else 503)

    async def _learn_gpu_ids(self, name: str) -> None:
        try:
            info = await within(self.models[name].ready.remote(), 1.0)
            self.gpu_ids[name] = list(info.get("gpu_ids", []))
        except Exception:  # noqa: BLE001 - placement facts are optional; readiness does not wait on them
            return

    # --- /v1/models/{id}, /v1/embeddings, /v1/completions (docs/endpoints.md) -----------

    @api.get("/v1/models/{model_id}", responses=ERRORS)
    async def retrieve_model(self, model_id: str, request: Request) -> Response:
        """One model object of the /v1/models list; 404 ``model_not_found`` otherwise."""
        try:
            await self._check_auth(request)
            return JSONResponse(find_model(model_objects(self.config, created=0), model_id))
        except SLMError as err:
            return error_response(err)

    @api.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(self, request: Request) -> Response:
        return await handlers.embeddings(self, request)

    @api.post("/v1/completions", responses=ERRORS)
    async def completions(self, request: Request) -> Response:
        return await handlers.text_completions(self, request)
