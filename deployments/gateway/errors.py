"""The one place where exceptions become OpenAI error bodies and HTTP statuses."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from cluster.errors import EngineUnavailableError, InternalError, SLMError, find_slm_error

log = logging.getLogger("ray.serve")

CLIENT_CLOSED = 499  # nginx's "client closed request": the status of a request whose client left

# Ray's own failures, by class name (their import paths move between Ray releases):
# a full queue or a dead/unavailable replica means "try again", not "we have a bug".
_RAY_UNAVAILABLE = {
    "BackPressureError": "The model is at capacity; retry shortly.",
    "DeploymentUnavailableError": "The model deployment is not available.",
    "RayActorError": "The model replica died while serving the request.",
    "ActorDiedError": "The model replica died while serving the request.",
    "ActorUnavailableError": "The model replica is unavailable.",
    "ObjectLostError": "The model replica lost the answer.",
}


def to_slm_error(exc: BaseException) -> SLMError:
    """A typed error for anything raised on the request path; unknown ones are our bug (500)."""
    found = find_slm_error(exc)
    if found is not None:
        return found
    for cls in type(exc).__mro__:
        if cls.__name__ in _RAY_UNAVAILABLE:
            return EngineUnavailableError(_RAY_UNAVAILABLE[cls.__name__])
    log.exception("gateway: unexpected error", exc_info=exc)
    return InternalError("Internal server error.")


def error_response(err: SLMError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=err.http_status, content=err.to_openai(), headers=headers)
