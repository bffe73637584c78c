"""The Gateway ingress: OpenAI-compatible HTTP in front of the router and the model servers.

``POST /v1/chat/completions`` (streamed and not), ``GET /v1/models``, ``/healthz`` and
``/readyz``. Every answer names the model version that served it and the route reason,
in the ``x-slm-*`` headers and the body's ``model`` field (``code@v1``).
"""


import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any, Awaitable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.chat import route_query, to_generation_request
from cluster.config import ClusterConfig
from cluster.errors import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    PayloadTooLargeError,
    SLMError,
)
from cluster.loader import format_loc
from cluster.openai_schema import ChatCompletionRequest, models_body
from cluster.routing import AUTO, decide_auto, listed_models, resolve_explicit
from cluster.types import GenerationRequest, RouteDecision
from deployments.gateway.errors import error_response, to_slm_error
from deployments.gateway.responses import anext_or_close, collect_completion, sse_events
from deployments.gateway.streams import timed_chunks

log = logging.getLogger("ray.serve")

api = FastAPI(title="slm-cluster gateway", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and methods get an OpenAI-style body too.
    err = InvalidRequestError(f"{request.method} {request.url.path}: {exc.detail}", code="not_found")
    err.http_status = exc.status_code
    return error_response(err)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors(include_url=False)[0]
    param = format_loc(tuple(first["loc"])) or None
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return f"Invalid value for {param}: {first['msg']}", param


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
        self.clock = time.monotonic
        self.api_keys = self._load_api_keys(env if env is not None else os.environ)
        self.model_ids = listed_models(config)

    def _load_api_keys(self, env: Mapping[str, str]) -> tuple[str, ...]:
        name = self.config.gateway.api_keys_env
        if name is None:
            return ()
        keys = tuple(k.strip() for k in env.get(name, "").split(",") if k.strip())
        if not keys:
            # Fail at start: a gateway that meant to require keys must not run open.
            raise ConfigError("no API keys", issues=(("gateway.api_keys_env", f"env var {name} is unset or empty"),))
        return keys

    # --- request plumbing -------------------------------------------------------------

    def _check_auth(self, request: "Request") -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token, key) for key in self.api_keys):
            raise AuthenticationError("Incorrect or missing API key. Send 'Authorization: Bearer <key>'.")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.gateway.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"The request body is {declared} bytes; the limit is {limit}.")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise PayloadTooLargeError(f"The request body is over the limit of {limit} bytes.")
        return bytes(body)

    def _parse(self, body: bytes) -> ChatCompletionRequest:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            message, param = validation_message(err)
            raise InvalidRequestError(message, param=param) from None

    async def _decide(self, requested: str, gen: GenerationRequest) -> RouteDecision:
        if requested != AUTO:
            return resolve_explicit(self.config, requested)
        timeout = self.config.router.request_timeout_s
        try:
            scores = await asyncio.wait_for(_await(self.router.route.remote(route_query(gen))), timeout)
        except Exception as exc:  # noqa: BLE001 - the router is an optimisation, not a dependency
            log.warning("gateway: router failed (%s); sending auto to the general model", type(exc).__name__)
            general = self.config.general
            return RouteDecision(model=general.name, version=general.current.name, reason="general:router-unavailable")
        return decide_auto(self.config, scores)

    @staticmethod
    def _headers(decision: RouteDecision | None) -> dict[str, str]:
        # Serve's proxy already echoes x-request-id; it is the id used here too.
        headers: dict[str, str] = {}
        if decision is not None:
            headers.update(
                {"x-slm-model": decision.model, "x-slm-version": decision.version, "x-slm-route-reason": decision.reason}
            )
            if decision.domain is not None:
                headers["x-slm-domain"] = decision.domain
            if decision.escalation_score is not None:
                headers["x-slm-escalation-score"] = f"{decision.escalation_score:.4f}"
            if decision.escalation_threshold is not None:
                headers["x-slm-escalation-threshold"] = f"{decision.escalation_threshold:.4f}"
        return headers

    # --- endpoints --------------------------------------------------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        decision: RouteDecision | None = None
        try:
            self._check_auth(request)
            wire = self._parse(await self._read_body(request))
            gen = to_generation_request(wire, self.config.gateway, request_id)
            decision = await self._decide(wire.model, gen)
            handle = self.models[decision.deployment_name]
            chunks = timed_chunks(handle, gen, self.config.gateway, self.clock)
            meta = {"id": f"chatcmpl-{request_id}", "created": int(time.time()), "model": decision.served_name}
            headers = self._headers(decision)
            if wire.stream:
                include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
                # Pull the first chunk before answering, so failures before any token get
                # a real status code instead of a 200 stream with an error in it.
                first = await anext_or_close(chunks)
                events = sse_events(first, chunks, meta, include_usage=include_usage, logprobs=gen.sampling.logprobs)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            body = await collect_completion(chunks, meta, logprobs=gen.sampling.logprobs)
            return JSONResponse(body, headers=headers)
        except Exception as exc:  # noqa: BLE001 - mapped to a typed error in one place
            err = to_slm_error(exc)
            log.info("gateway: %s -> %s %s", request_id, err.http_status, err.code)
            return error_response(err, headers=self._headers(decision))

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except SLMError as err:
            return error_response(err)
        return JSONResponse(models_body(self.model_ids, created=0))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> Response:
        names = list(self.models)

        async def probe(name: str) -> dict[str, Any]:
            try:
                info = await asyncio.wait_for(_await(self.models[name].ready.remote()), 5.0)
                return {"deployment": name, "ready": True, "gpu_ids": info.get("gpu_ids", [])}
            except Exception as exc:  # noqa: BLE001 - reported per deployment
                return {"deployment": name, "ready": False, "error": to_slm_error(exc).message}

        results = await asyncio.gather(*(probe(n) for n in names))
        ok = all(r["ready"] for r in results)
        return JSONResponse({"ready": ok, "deployments": results}, status_code=200 if ok else 503)

