"""Runs inside Ray Serve's HTTP proxy, before Serve's own request-id handling: drops an
``x-request-id`` header that is not short and safe, so Serve makes a fresh id instead.

Why it is needed (Ray 2.60): the proxy reads ``x-request-id`` before any of our code runs.
Its ``RequestIdMiddleware`` echoes the client's value in the response whatever it is (a
6 KB id comes back as a 6 KB header), and the proxy then decodes the raw header bytes as
UTF-8 to name the request: an id that is not valid UTF-8 (``\\xe9`` in Latin-1) raises
UnicodeDecodeError there and the client gets a plain-text ``500 Internal Server Error``
from the proxy, never reaching the gateway. The gateway's own ``clean_request_id``
(``deployments/gateway/edge.py``) cannot help: it runs after.

Serve applies user middlewares outside its ``RequestIdMiddleware`` (so they run first)
when the proxy process finds ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` naming a
function that returns them: ``deployments.gateway.proxy_ids:middlewares``. The variable
must be in the environment of the Ray node when it starts (``slmctl up`` sets it for the
Ray it starts; on Kubernetes, in the Ray pods' env). ``HTTPOptions.middlewares`` was
removed from Serve, so this is the one hook. The proxy imports this module: it depends on
nothing but ``re`` and Starlette, which the proxy has.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, MutableMapping

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "deployments.gateway.proxy_ids:middlewares"
MAX_REQUEST_ID = 128  # as edge.clean_request_id; a unit test holds the two to the same rule
SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,%d}" % MAX_REQUEST_ID)
_HEADER = b"x-request-id"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def safe_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """The headers without any unsafe ``x-request-id``; None when nothing was dropped."""
    kept = [(k, v) for k, v in headers if k.lower() != _HEADER or SAFE_ID.fullmatch(v)]
    return kept if len(kept) != len(headers) else None


class SafeRequestId:
    """Pure ASGI middleware: an unsafe ``x-request-id`` is removed before Serve sees it,
    so Serve generates the id, echoes that one, and the gateway uses it too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            kept = safe_headers(list(scope.get("headers") or []))
            if kept is not None:
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def middlewares() -> list[Any]:
    """The callback that ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names."""
    from starlette.middleware import Middleware

    return [Middleware(SafeRequestId)]
