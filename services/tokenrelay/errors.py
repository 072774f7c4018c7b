"""The one exception hierarchy of tokenrelay.

Domain code raises these; each transport maps them to its wire status in one place
(``orchestrator/_status.py`` for gRPC, ``edge/_errors.py`` for HTTP)::

    RelayError                      base; never raised itself
    ├── InvalidRequest              malformed or out of bounds (400 / INVALID_ARGUMENT)
    │   ├── NotFound                a named thing does not exist (404 / NOT_FOUND)
    │   │   ├── ModelNotFound       the model is not in the catalog
    │   │   └── CollectionNotFound  no such retrieval collection
    │   └── AlreadyExists           the name is taken (409 / ALREADY_EXISTS)
    ├── Unauthenticated             missing or wrong credentials (401 / UNAUTHENTICATED)
    ├── Overloaded                  at capacity; retry later (429 / RESOURCE_EXHAUSTED)
    ├── UpstreamUnavailable         no inference node can serve now (503 / UNAVAILABLE)
    ├── UpstreamTimeout             a deadline or watchdog expired (504 / DEADLINE_EXCEEDED)
    └── GenerationFailed            the model failed while generating (500 / INTERNAL)

Messages are written for the caller: they never carry addresses, stack traces or a
dependency's raw error text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenrelay.generation import Usage

__all__ = [
    "AlreadyExists",
    "CollectionNotFound",
    "GenerationFailed",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "RelayError",
    "Unauthenticated",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class RelayError(Exception):
    """Base of every error tokenrelay reports to a caller.

    ``outcome`` names the kind in metrics and logs (``tokenrelay_requests_total{outcome}``).
    ``usage`` is set on an error that ended a generation after tokens went out: what the
    caller is billed for so far."""

    outcome = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.usage: Usage | None = None


class InvalidRequest(RelayError):
    """The request is malformed or out of bounds.

    ``param`` names the offending field; ``code`` is a machine-readable reason where OpenAI defines
    one (e.g. ``context_length_exceeded``).
    """

    outcome = "invalid"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class NotFound(InvalidRequest):
    """A named thing (model, collection) does not exist."""

    outcome = "not_found"


class ModelNotFound(NotFound):
    """The requested model is not in the catalog."""

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(
            message or f"The model '{model}' does not exist.", param="model", code="model_not_found"
        )


class CollectionNotFound(NotFound):
    """The retrieval collection does not exist."""

    def __init__(self, name: str, param: str = "collection") -> None:
        super().__init__(
            f"The collection '{name}' does not exist.", param=param, code="collection_not_found"
        )


class AlreadyExists(InvalidRequest):
    """The name is already taken."""

    outcome = "invalid"


class Unauthenticated(RelayError):
    """Credentials are missing or wrong; ``code`` as OpenAI spells it (``invalid_api_key``)."""

    outcome = "unauthenticated"

    def __init__(self, message: str, code: str | None = "invalid_api_key") -> None:
        super().__init__(message)
        self.code = code


class Overloaded(RelayError):
    """The service is at capacity; ``retry_after`` is a hint in seconds."""

    outcome = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class UpstreamUnavailable(RelayError):
    """No inference node can serve the request now."""

    outcome = "unavailable"


class UpstreamTimeout(RelayError):
    """A deadline or watchdog expired before the answer was complete."""

    outcome = "timeout"


class GenerationFailed(RelayError):
    """The model reported a failure while generating."""
