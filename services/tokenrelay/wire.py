"""How a ``RelayError`` crosses a gRPC hop: a ``google.rpc.Status`` with typed details.

The orchestrator aborts a call with the error's status code and message, plus, in the standard
``grpc-status-details-bin`` trailer (as grpc's ``examples/python/errors`` do):

- ``google.rpc.ErrorInfo``: ``reason`` names the error's class (``RelayError.reason``), ``domain``
  is ``tokenrelay``, ``metadata["code"]`` the OpenAI error code where there is one;
- ``google.rpc.BadRequest``: the offending field (``param``);
- ``google.rpc.RetryInfo``: when to retry (``Overloaded``);
- ``tokenrelay.v1.PartialUsage``: what a generation had produced when it failed mid-stream.

A gRPC client reads them with ``grpc_status.rpc_status.from_call``; the edge rebuilds the very
error class from ``ErrorInfo.reason`` (``from_rpc_error``). A status without tokenrelay's details
comes from gRPC itself (an unreachable orchestrator, a refused call) and is mapped by its code
alone, with a message of our own: its text may name internal addresses.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from tokenrelay.errors import (
    Overloaded,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Usage
from tokenrelay.v1 import generation_pb2 as pb

__all__ = [
    "DETAILS_KEY",
    "DOMAIN",
    "from_rpc_error",
    "status_of",
    "to_status",
    "trailers",
    "usage_to_pb",
]

DOMAIN = "tokenrelay"
DETAILS_KEY = "grpc-status-details-bin"


def usage_to_pb(usage: Usage) -> pb.Usage:
    """Token counts as the wire carries them (both services speak it)."""
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def status_of(exc: RelayError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.grpc_code]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(exc: RelayError) -> status_pb2.Status:
    """``exc`` as a ``google.rpc.Status`` with its details."""
    code = status_of(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN)
    if exc.code:
        info.metadata["code"] = exc.code
    details = [_pack(info)]
    if exc.param:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.param, description=exc.message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if exc.usage is not None:
        details.append(_pack(pb.PartialUsage(usage=usage_to_pb(exc.usage))))
    return status_pb2.Status(code=code.value[0], message=exc.message, details=details)


def trailers(exc: RelayError) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries ``exc``'s status details."""
    return ((DETAILS_KEY, to_status(exc).SerializeToString()),)


# A status from gRPC itself, by code: the most general class with that code (others: internal).
_BY_CODE: dict[grpc.StatusCode, type[RelayError]] = {
    grpc.StatusCode.UNAVAILABLE: UpstreamUnavailable,
    grpc.StatusCode.CANCELLED: UpstreamUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: UpstreamTimeout,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}
_GENERIC = {
    UpstreamUnavailable: "The service is temporarily unavailable.",
    UpstreamTimeout: "The request did not complete in time.",
    Overloaded: "The service is at capacity; retry later.",
}


def _details(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer is as good as none
                return None
            return status if status.code == error.code().value[0] else None
    return None


def from_rpc_error(error: grpc.aio.AioRpcError) -> RelayError:
    """The ``RelayError`` a failed call reports: rebuilt from tokenrelay's details when it has
    them, else by its code alone (``RelayError`` — an internal error — for unexpected codes)."""
    status = _details(error)
    info = error_details_pb2.ErrorInfo()
    param = retry_after = None
    usage = None
    found = False
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            found = info.domain == DOMAIN
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            param = bad.field_violations[0].field if bad.field_violations else None
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(pb.PartialUsage.DESCRIPTOR):
            partial = pb.PartialUsage()
            detail.Unpack(partial)
            usage = Usage(partial.usage.prompt_tokens, partial.usage.completion_tokens)
    if found and status is not None:
        exc = RelayError.restore(
            info.reason, status.message, param, info.metadata.get("code") or None, retry_after
        )
    else:
        kind = _BY_CODE.get(error.code(), RelayError)
        exc = RelayError.restore(kind.reason, _GENERIC.get(kind, "Internal error."))
        if kind is Overloaded:
            exc.retry_after = 1.0
    exc.usage = usage
    return exc
