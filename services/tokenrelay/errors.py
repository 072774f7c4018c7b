"""The one exception hierarchy of tokenrelay.

Domain code raises these. Each class carries what every border needs — its gRPC status code, its
HTTP status, its OpenAI error type, the ``outcome`` label of metrics and logs, and a stable
``reason`` that names it on the wire — so the border tables (``orchestrator/_border.py`` for gRPC,
``edge/_middlewares.py`` for HTTP, and the edge's way back from a gRPC status in
``edge/_generate.py``) are derived from the classes, never written out by hand::

    RelayError                      base (500 / INTERNAL)
    ├── InvalidRequest              malformed or out of bounds (400 / INVALID_ARGUMENT)
    │   ├── NotFound                a named thing does not exist (404 / NOT_FOUND)
    │   │   ├── ModelNotFound       the model is not in the catalog
    │   │   ├── CollectionNotFound  no such retrieval collection
    │   │   └── StreamNotFound      no resumable stream by that id (or its grace is over)
    │   ├── AlreadyExists           the name is taken (409 / ALREADY_EXISTS)
    │   └── Gone                    what was asked for existed but is no longer held (410)
    ├── Unauthenticated             missing or wrong credentials (401 / UNAUTHENTICATED)
    ├── PermissionDenied            the credentials may not do this (403 / PERMISSION_DENIED)
    ├── Overloaded                  at capacity; retry later (429 / RESOURCE_EXHAUSTED)
    │   └── QuotaExceeded           the key's token budget for the period is spent
    ├── LimitsUnavailable           limits store down, policy closed (503 / UNAVAILABLE)
    ├── UpstreamUnavailable         no inference node can serve now (503 / UNAVAILABLE)
    ├── UpstreamTimeout             a deadline or watchdog expired (504 / DEADLINE_EXCEEDED)
    └── GenerationFailed            the model failed while generating (500 / INTERNAL)

Extras travel with the error: ``param`` (the offending field), ``code`` (a machine-readable
reason where OpenAI defines one, e.g. ``context_length_exceeded``), ``retry_after`` (seconds) and
``usage`` (what a stream that failed after tokens went out generated so far). Over gRPC they are
rich status details (``tokenrelay.wire``), never ad-hoc strings.

Messages are written for the caller: they never carry addresses, stack traces or a
dependency's raw error text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from tokenrelay.generation import Usage

__all__ = [
    "AlreadyExists",
    "CollectionNotFound",
    "GenerationFailed",
    "Gone",
    "InvalidRequest",
    "LimitsUnavailable",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "QuotaExceeded",
    "RelayError",
    "Unauthenticated",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class RelayError(Exception):
    """Base of every error tokenrelay reports to a caller; raised itself only for an internal
    error whose details stay in the log."""

    grpc_code: ClassVar[str] = "INTERNAL"  # a grpc.StatusCode name
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    outcome: ClassVar[str] = "failed"  # tokenrelay_requests_total{outcome}
    reason: ClassVar[str] = "INTERNAL"  # names the class on the wire (google.rpc.ErrorInfo)
    _by_reason: ClassVar[dict[str, type[RelayError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "reason" in cls.__dict__:
            RelayError._by_reason[cls.reason] = cls

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.usage: Usage | None = None

    @staticmethod
    def restore(
        reason: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> RelayError:
        """The error a peer reported by ``reason`` (its class's name on the wire), rebuilt with
        its extras; a reason this build does not know gives a plain ``RelayError``."""
        cls = RelayError._by_reason.get(reason, RelayError)
        error = cls.__new__(cls)
        RelayError.__init__(error, message, param, code, retry_after)
        return error


RelayError._by_reason[RelayError.reason] = RelayError


class InvalidRequest(RelayError):
    """The request is malformed or out of bounds; nothing was sent to a model."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    openai_type = "invalid_request_error"
    outcome = "invalid"
    reason = "INVALID_REQUEST"


class NotFound(InvalidRequest):
    """A named thing (model, collection) does not exist."""

    grpc_code = "NOT_FOUND"
    http_status = 404
    outcome = "not_found"
    reason = "NOT_FOUND"


class ModelNotFound(NotFound):
    """The requested model is not in the catalog."""

    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(
            message or f"The model '{model}' does not exist.", param="model", code="model_not_found"
        )


class CollectionNotFound(NotFound):
    """The retrieval collection does not exist."""

    reason = "COLLECTION_NOT_FOUND"

    def __init__(self, name: str, param: str = "collection") -> None:
        super().__init__(
            f"The collection '{name}' does not exist.", param=param, code="collection_not_found"
        )


class StreamNotFound(NotFound):
    """No resumable stream has this id (a wrong id, or its grace period is over)."""

    reason = "STREAM_NOT_FOUND"

    def __init__(self, stream_id: str) -> None:
        super().__init__(
            f"No resumable stream '{stream_id}': the id is wrong, or the stream's grace period"
            " is over.",
            param="id",
            code="stream_not_found",
        )


class AlreadyExists(InvalidRequest):
    """The name is already taken."""

    grpc_code = "ALREADY_EXISTS"
    http_status = 409
    reason = "ALREADY_EXISTS"


class Gone(InvalidRequest):
    """What was asked for existed, but is no longer held (e.g. events that left a replay
    buffer)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 410
    outcome = "gone"
    reason = "GONE"


class Unauthenticated(RelayError):
    """Credentials are missing or wrong; ``code`` as OpenAI spells it (``invalid_api_key``)."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401
    openai_type = "authentication_error"
    outcome = "unauthenticated"
    reason = "UNAUTHENTICATED"

    def __init__(self, message: str, code: str | None = "invalid_api_key") -> None:
        super().__init__(message, code=code)


class PermissionDenied(RelayError):
    """The credentials are valid but may not do this (e.g. resume another key's stream)."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403
    openai_type = "permission_error"
    outcome = "denied"
    reason = "PERMISSION_DENIED"


class Overloaded(RelayError):
    """The service is at capacity; ``retry_after`` is a hint in seconds."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    openai_type = "rate_limit_error"
    outcome = "overloaded"
    reason = "OVERLOADED"

    def __init__(self, message: str, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class QuotaExceeded(Overloaded):
    """The key's token budget for its period is spent (OpenAI's ``insufficient_quota``);
    ``retry_after`` is when the next period starts."""

    openai_type = "insufficient_quota"
    outcome = "over_budget"
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after, code="insufficient_quota")


class LimitsUnavailable(RelayError):
    """The shared limits store cannot be reached and the policy is to fail closed."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    openai_type = "service_unavailable"
    outcome = "unavailable"
    reason = "LIMITS_UNAVAILABLE"


class UpstreamUnavailable(RelayError):
    """No inference node can serve the request now."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    openai_type = "service_unavailable"
    outcome = "unavailable"
    reason = "UPSTREAM_UNAVAILABLE"


class UpstreamTimeout(RelayError):
    """A deadline or watchdog expired before the answer was complete."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504
    openai_type = "timeout"
    outcome = "timeout"
    reason = "UPSTREAM_TIMEOUT"


class GenerationFailed(RelayError):
    """The model reported a failure while generating."""

    reason = "GENERATION_FAILED"
