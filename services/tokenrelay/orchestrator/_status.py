"""The one mapping from tokenrelay errors to gRPC status, for every servicer method.

``@grpc_errors`` wraps a unary or server-streaming method: a ``RelayError`` aborts the call with
its status code and message (and ``tokenrelay-error-param`` / ``tokenrelay-error-code`` /
``retry-after`` / ``tokenrelay-usage`` trailing metadata where they apply); any other exception
is logged with its traceback and becomes INTERNAL with a fixed message, so no exception text or
traceback reaches a caller (grpc.aio would otherwise send it as UNKNOWN).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Span

from tokenrelay.errors import (
    AlreadyExists,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    Overloaded,
    RelayError,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.logs import bind
from tokenrelay.metrics import outcome_of
from tokenrelay.tracing import current_trace_id, mark_cancelled, mark_error, server_span
from tokenrelay.v1 import generation_pb2

__all__ = ["STATUS", "grpc_errors", "trailing_metadata"]

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
STATUS: tuple[tuple[type[RelayError], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE),
    (UpstreamTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (GenerationFailed, grpc.StatusCode.INTERNAL),
)

M = TypeVar("M", bound=Callable[..., Any])
_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def status_of(exc: RelayError) -> grpc.StatusCode:
    return next(code for kind, code in STATUS if isinstance(exc, kind))


def trailing_metadata(exc: RelayError) -> tuple[tuple[str, str], ...]:
    metadata: list[tuple[str, str]] = []
    if isinstance(exc, InvalidRequest):
        if exc.param:
            metadata.append(("tokenrelay-error-param", exc.param))
        if exc.code:
            metadata.append(("tokenrelay-error-code", exc.code))
    if isinstance(exc, Overloaded):
        metadata.append(("retry-after", f"{exc.retry_after:g}"))
    if exc.usage is not None:  # the stream had started: what was generated before the error
        usage = f"{exc.usage.prompt_tokens},{exc.usage.completion_tokens}"
        metadata.append(("tokenrelay-usage", usage))
    return tuple(metadata)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, RelayError):
        code = status_of(exc)
        log.info(
            "request refused", extra={"fields": {"grpc_code": code.name, "error": exc.message}}
        )
        await context.abort(code, exc.message, trailing_metadata(exc))
    log.exception("unexpected error while serving a request", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "Internal error.")


def _request_fields(request: Any) -> dict[str, str]:
    """Give a request that has a ``request_id`` field one (if the caller sent none), so every
    log line of the call, refusals included, carries it."""
    if not hasattr(request, "request_id"):
        return {}
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return {"request_id": str(request.request_id)[:128]}


@contextmanager
def _border(service: str, method: str, request: Any, context: Any) -> Iterator[Span]:
    """The call's server span (continuing the caller's traceparent) and log fields."""
    fields = _request_fields(request)
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if fields:
        attributes["tokenrelay.request_id"] = fields["request_id"]
    with (
        server_span(f"{service}/{method}", context.invocation_metadata() or (), attributes) as span,
        bind(**fields, trace_id=current_trace_id()),
    ):
        yield span


def _mark(span: Span, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        mark_cancelled(span)
    elif isinstance(exc, RelayError):
        mark_error(span, outcome_of(exc), exc.message)
    elif not isinstance(exc, grpc.aio.AbortError):
        mark_error(span, "failed", "internal error")


def _service(servicer: Any) -> str:
    """The full gRPC service name of a servicer (``service_name``, else GenerationService)."""
    return str(getattr(servicer, "service_name", _SERVICE))


def grpc_errors(method: M) -> M:
    """Map exceptions raised by a servicer method to gRPC status (see module docstring), inside
    the call's server span."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            with _border(_service(self), name, request, context) as span:
                try:
                    async with aclosing(method(self, request, context)) as messages:
                        async for message in messages:
                            yield message
                except grpc.aio.AbortError:
                    raise
                except (asyncio.CancelledError, GeneratorExit) as exc:
                    _mark(span, exc)
                    raise
                except Exception as exc:
                    _mark(span, exc)
                    await _abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        with _border(_service(self), name, request, context) as span:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError as exc:
                _mark(span, exc)
                raise
            except Exception as exc:
                _mark(span, exc)
                await _abort(context, exc)

    return unary  # type: ignore[return-value]
