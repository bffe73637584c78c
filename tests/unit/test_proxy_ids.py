"""The middleware that runs in Serve's HTTP proxy before Serve's request-id handling
(deployments/gateway/proxy_ids.py): an unsafe x-request-id never gets past it."""

from __future__ import annotations

import pytest

from cluster.serve_config import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from deployments.gateway import proxy_ids
from deployments.gateway.edge import clean_request_id

IDS = ["X-1", "a" * 128, "a" * 129, "a" * 6000, "a b", "X-1;drop", "\u00e9t\u00e9", "", "ok.id:7_x"]


@pytest.mark.parametrize("rid", IDS)
def test_the_proxy_and_the_gateway_agree_on_what_is_safe(rid: str) -> None:
    kept = proxy_ids.safe_headers([(b"x-request-id", rid.encode("utf-8"))])
    assert (kept is None) == (clean_request_id(rid) == rid)


def test_only_unsafe_request_ids_are_dropped() -> None:
    headers = [(b"host", b"x"), (b"X-Request-ID", b"\xe9t\xe9"), (b"x-request-id", b"good-1"), (b"accept", b"*/*")]
    assert proxy_ids.safe_headers(headers) == [(b"host", b"x"), (b"x-request-id", b"good-1"), (b"accept", b"*/*")]
    assert proxy_ids.safe_headers([(b"host", b"x"), (b"x-request-id", b"fine")]) is None


async def test_the_middleware_hands_on_a_scope_without_the_unsafe_id() -> None:
    seen: list[list] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        seen.append(scope.get("headers"))

    scope = {"type": "http", "headers": [(b"x-request-id", b"a" * 6000), (b"host", b"h")]}
    await proxy_ids.SafeRequestId(app)(scope, None, None)
    await proxy_ids.SafeRequestId(app)({"type": "lifespan"}, None, None)  # nothing to clean
    assert seen[0] == [(b"host", b"h")] and scope["headers"][0][0] == b"x-request-id"  # the caller's scope is untouched
    assert seen[1] is None
    assert [m.cls for m in proxy_ids.middlewares()] == [proxy_ids.SafeRequestId]


def test_slmctl_names_this_module_to_the_proxy() -> None:
    module, _, func = PROXY_CALLBACK.partition(":")
    assert (PROXY_CALLBACK_ENV, PROXY_CALLBACK) == (proxy_ids.CALLBACK_ENV, proxy_ids.CALLBACK)
    assert module == proxy_ids.__name__ and callable(getattr(proxy_ids, func))
