"""One typed error hierarchy for the whole request path.

Each error knows its HTTP status, its OpenAI error ``type`` and ``code``, and whether a
retry may succeed. Errors are raised, never yielded as values; they pickle across Ray
(``__reduce__`` keeps the keyword arguments); the gateway maps them to OpenAI error bodies
in one place. Our own bugs are 500s (``InternalError``), never disguised as 400s.
"""

from __future__ import annotations

from typing import Any


class SLMError(Exception):
    http_status: int = 500
    error_type: str = "server_error"
    default_code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI-style error body: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(cls: type[SLMError], message: str, param: str | None, code: str | None) -> SLMError:
    return cls(message, param=param, code=code)


# --- client errors (4xx) -------------------------------------------------------------


class InvalidRequestError(SLMError):
    http_status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class PIIDetectedError(InvalidRequestError):
    """The request carries personal data and the policy is ``pii: block``."""

    default_code = "pii_detected"


class AuthenticationError(SLMError):
    http_status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PolicyViolationError(SLMError):
    """The request's data class may not go where it asked to go."""

    http_status = 403
    error_type = "permission_error"
    default_code = "data_policy_violation"


class ModelNotFoundError(SLMError):
    http_status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLargeError(SLMError):
    http_status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RequestTimeoutError(SLMError):
    """The client did not send its request body within ``gateway.body_timeout_s``."""

    http_status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class RateLimitedError(SLMError):
    http_status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limited"
    retryable = True


class ModelNotAllowedError(SLMError):
    """The API key's scope does not cover the model, strategy or data class asked for."""

    http_status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class AdminOnlyError(SLMError):
    """The endpoint is the operator's (``/v1/slm/*``): an env-var key or a managed key
    created with ``slmctl keys create --admin`` may read it, other managed keys may not."""

    http_status = 403
    error_type = "permission_error"
    default_code = "admin_only"


class RateLimitExceededError(RateLimitedError):
    """The key is over its requests or tokens per minute (``Retry-After`` says when to retry)."""

    default_code = "rate_limit_exceeded"


class QuotaExceededError(SLMError):
    """The key has spent its USD budget for the UTC day; retrying today will not help."""

    http_status = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


# --- server and upstream errors (5xx) ------------------------------------------------


class InternalError(SLMError):
    """A bug of ours. Always a 500."""


class EngineError(SLMError):
    """The engine (or the upstream API) failed to produce an answer."""

    http_status = 502
    error_type = "upstream_error"
    default_code = "engine_error"
    retryable = True


class EngineUnavailableError(EngineError):
    """No healthy engine (or replica) can take the request now."""

    http_status = 503
    error_type = "service_unavailable"
    default_code = "engine_unavailable"


class EngineTimeoutError(EngineError):
    """The engine did not answer (or stalled mid-stream) within its deadline."""

    http_status = 504
    error_type = "timeout"
    default_code = "engine_timeout"


class ReplicaGoneError(EngineUnavailableError):
    """The model replica died or became unreachable during the call (Ray's actor errors).
    The one error the gateway retries, once, on another replica, and only before the first
    chunk (``deployments/gateway/faults.py``)."""

    default_code = "replica_unavailable"


class CircuitOpenError(EngineUnavailableError):
    """The frontier's circuit breaker is open: no call goes until ``retry_after_s`` passes."""

    default_code = "frontier_circuit_open"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_circuit, (self.message, self.param, self.code, self.retry_after_s))


def _rebuild_circuit(message: str, param: str | None, code: str | None, retry_after_s: float) -> CircuitOpenError:
    return CircuitOpenError(message, param=param, code=code, retry_after_s=retry_after_s)


# --- configuration -------------------------------------------------------------------


class ConfigError(SLMError):
    """A cluster config is invalid. ``issues`` holds one (path, reason) per problem."""

    default_code = "invalid_config"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        issues: tuple[tuple[str, str], ...] = (),
        source: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.issues = tuple(issues)
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_config, (self.message, self.issues, self.source))

    def __str__(self) -> str:
        where = self.source or "<config>"
        if not self.issues:
            return f"{where}: {self.message}"
        return "\n".join(f"{where}: {path or '<root>'}: {reason}" for path, reason in self.issues)


def _rebuild_config(message: str, issues: tuple[tuple[str, str], ...], source: str | None) -> ConfigError:
    return ConfigError(message, issues=issues, source=source)


class ArtifactError(ConfigError):
    """A model or router artifact is missing, corrupt or built for something else."""

    default_code = "invalid_artifact"


def find_slm_error(exc: BaseException) -> SLMError | None:
    """The SLMError inside ``exc``, looking through wrappers (Ray's RayTaskError and
    exception chains) so a typed error raised in a replica keeps its meaning here."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # Ray re-raises a replica's error as a RayTaskError subclass of the original class;
        # its ``cause`` is the original instance, with our attributes intact.
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):
            current = cause
            continue
        if isinstance(current, SLMError):
            return current
        current = current.__cause__ or current.__context__
    return None
