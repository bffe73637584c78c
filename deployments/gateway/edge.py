"""The gateway's edge against hostile input: request ids, API keys, the body read, the
catch-all error handlers and the OpenAPI description of the endpoints.

Whatever a client sends, the answer is an OpenAI error body with a 4xx status (or a 500
for a bug of ours), never a plain-text 500 and never a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import InternalError, InvalidRequestError, PayloadTooLargeError, RequestTimeoutError
from cluster.openai_schema import ChatCompletionRequest
from deployments.gateway.errors import error_response

log = logging.getLogger("ray.serve")

MAX_REQUEST_ID = 128
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_REQUEST_ID)


def clean_request_id(header: str | None) -> str:
    """The client's ``x-request-id`` when it is short and safe (``[A-Za-z0-9._:-]``, at
    most 128 characters), else a fresh id. It names the request to the client and in our
    logs; it is never an engine's request id (engines make their own unique ids)."""
    if header is not None and _SAFE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def key_matches(token: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison on bytes, so any token (non-ASCII included) is just wrong."""
    given = token.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(given, key.encode("utf-8")) for key in keys)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, at most ``limit`` bytes (413 past it), read within ``timeout_s`` (408
    past it), so a slow upload cannot hold a request slot for ever."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request body is {declared} bytes; the limit is {limit}.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise PayloadTooLargeError(f"The request body is over the limit of {limit} bytes.")
    except TimeoutError:
        raise RequestTimeoutError(f"The request body did not arrive within {timeout_s:g} s.") from None
    return bytes(body)


def install_error_handlers(api: FastAPI) -> None:
    """Every error leaves as an OpenAI body: unknown paths and methods, validation errors
    and anything unexpected (a 500 ``internal_error``, logged with its traceback)."""

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = InvalidRequestError(f"{request.method} {request.url.path}: {exc.detail}", code="not_found")
        err.http_status = exc.status_code
        return error_response(err)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequestError(f"Invalid request: {exc.errors()[:1]}"))

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway: unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(InternalError("Internal server error."))


# --- OpenAPI ---------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, to embed in an OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_ERROR = {"model": ErrorBody, "description": "An OpenAI error body."}
ERRORS: dict[int | str, dict[str, Any]] = {status: _ERROR for status in (400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504)}
CHAT_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(ChatCompletionRequest)}}},
}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat.completion body, or an SSE stream of chat.completion.chunk events when `stream` is true.",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}},
    },
    **ERRORS,
}
