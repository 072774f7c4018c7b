"""The one error model: each class knows its codes, crosses the gRPC hop with its extras as rich
status details, and comes back as the same class; Triton's failures are classified by code."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from tokenrelay import errors
from tokenrelay.errors import (
    CollectionNotFound,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RelayError,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Usage
from tokenrelay.orchestrator._triton import _classify
from tokenrelay.wire import from_rpc_error, status_of, trailers


def _over_the_wire(exc: RelayError) -> RelayError:
    """``exc`` as the orchestrator aborts with it, read back as the edge reads a failed call."""
    rpc = AioRpcError(status_of(exc), Metadata(), Metadata(*trailers(exc)), exc.message)
    return from_rpc_error(rpc)


def _every_class() -> list[type[RelayError]]:
    return [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("cls", _every_class(), ids=lambda c: c.__name__)
def test_every_error_class_names_its_codes_and_a_unique_reason(cls: type[RelayError]) -> None:
    assert grpc.StatusCode[cls.grpc_code] is not None
    assert 400 <= cls.http_status < 600 and cls.openai_type and cls.outcome
    reasons = [c.reason for c in _every_class()]
    assert reasons.count(cls.reason) == 1


@pytest.mark.parametrize(
    "exc",
    [
        InvalidRequest("'top_p' must be between 0 and 1; got 7.", "top_p"),
        InvalidRequest("Too long.", "messages", code="context_length_exceeded"),
        ModelNotFound("nope"),
        CollectionNotFound("notes", "retrieval.collection"),
        Overloaded("At capacity.", retry_after=2.5, code="rate_limit_exceeded"),
        UpstreamUnavailable("No inference node is ready to serve 'm'."),
        UpstreamTimeout("The model produced no token for 30 s."),
        GenerationFailed("The model failed while generating."),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_comes_back_as_the_same_class_with_its_extras(exc: RelayError) -> None:
    exc.usage = Usage(12, 5)
    back = _over_the_wire(exc)
    assert type(back) is type(exc)
    assert (back.message, back.param, back.code, back.retry_after, back.usage) == (
        exc.message,
        exc.param,
        exc.code,
        exc.retry_after,
        Usage(12, 5),
    )


@pytest.mark.parametrize(
    ("code", "kind", "status"),
    [
        (grpc.StatusCode.UNAVAILABLE, UpstreamUnavailable, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, UpstreamTimeout, 504),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded, 429),
        (grpc.StatusCode.UNAUTHENTICATED, RelayError, 500),  # the edge is misconfigured
        (grpc.StatusCode.UNKNOWN, RelayError, 500),
    ],
)
def test_grpcs_own_statuses_map_by_code_and_never_leak_their_text(
    code: grpc.StatusCode, kind: type[RelayError], status: int
) -> None:
    details = "failed to connect to all addresses; last error: 10.0.0.7:50051 refused"
    back = from_rpc_error(AioRpcError(code, Metadata(), Metadata(), details))
    assert type(back) is kind and back.http_status == status
    assert "10.0.0.7" not in back.message
    # An unreachable orchestrator's message would not become a client's error either way.
    assert not isinstance(back, Unauthenticated)


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        # Our models send INVALID_ARG; Triton reports a model it lacks as NOT_FOUND/UNAVAILABLE.
        (grpc.StatusCode.INVALID_ARGUMENT, "top_k must be at least -1", InvalidRequest),
        (
            grpc.StatusCode.NOT_FOUND,
            "Request for unknown model: 'x' is not found",
            UpstreamUnavailable,
        ),
        (grpc.StatusCode.UNAVAILABLE, "model 'x' is not ready", UpstreamUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", UpstreamTimeout),
        # Words in a failure's message never take a node out of rotation.
        (grpc.StatusCode.INTERNAL, "tensor 'x' not found in the cache", GenerationFailed),
        (None, "Error generating stream: the model is not ready", GenerationFailed),
        # vLLM's backend sends every failure as INTERNAL: phrases are the last resort there.
        (grpc.StatusCode.INTERNAL, "exceeds the maximum context length of 2048", InvalidRequest),
        (None, "sampling parameter 'top_p' is out of range: 0.0", InvalidRequest),
    ],
)
def test_triton_failures_are_classified_by_status_code_first(
    code: grpc.StatusCode | None, message: str, kind: type[RelayError]
) -> None:
    error = _classify(code, message, "node:1")
    assert type(error) is kind
    assert message not in error.message or not message  # the upstream's words stay in the log


def test_a_context_overflow_says_so_in_openai_terms() -> None:
    error = _classify(grpc.StatusCode.INVALID_ARGUMENT, "the context window is 2048 tokens", "n:1")
    assert (error.param, error.code) == ("messages", "context_length_exceeded")
