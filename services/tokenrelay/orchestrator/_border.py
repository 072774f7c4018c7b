"""The gRPC border of every call the orchestrator serves, in one server interceptor.

``BorderInterceptor`` wraps every method handler, so a new RPC cannot forget any of this:

- **Decoding**: a request that does not decode (truncated, invalid UTF-8 in a string field,
  garbage) gets INVALID_ARGUMENT with a plain message on every RPC, health and reflection
  included; gRPC would otherwise answer UNKNOWN naming a Python class.
- For tokenrelay's own services: a SERVER **span** continuing the caller's ``traceparent``, the
  call's **request id** (generated when the request has a ``request_id`` field left empty) and the
  **log fields** bound for every line the call writes;
- **Errors**: a ``RelayError`` aborts the call with its status code, message and rich details
  (``tokenrelay.wire``); any other exception is logged with its traceback and becomes INTERNAL
  with a fixed message, so no exception text reaches a caller. A call that is already over (the
  client left, its deadline passed) is a cancellation, not an error, whatever its handler raises.

Server-streaming handlers (async generators) are run with gRPC's writer API (``context.write``):
the generator is then always closed in the call's own task, so per-request state (log fields,
spans, leases) is cleaned up where it was set, also when the call ends mid-stream. (Handed an
async generator, grpc.aio stops iterating a terminated call without closing it, and the garbage
collector finalizes it later from another task and Context.)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeAlias

import grpc
from opentelemetry.trace import Span

from tokenrelay.errors import RelayError
from tokenrelay.logs import bind
from tokenrelay.metrics import outcome_of
from tokenrelay.tracing import current_trace_id, mark_cancelled, mark_error, server_span
from tokenrelay.wire import status_of, trailers

__all__ = ["BorderInterceptor"]

log = logging.getLogger(__name__)

_OURS = "/tokenrelay."
_UNDECODABLE_MESSAGE = "The request message could not be decoded (malformed protobuf)."

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)


class _Undecodable:
    """What the request deserializer returns for bytes that are not a request message."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # DecodeError, and whatever else a malformed message may raise
            return _UNDECODABLE

    return decode


async def _refuse_undecodable(context: Context) -> None:
    log.info("request refused: undecodable message")
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE_MESSAGE)


def _request_fields(request: Any) -> dict[str, str]:
    """Give a request that has a ``request_id`` field one (if the caller sent none), so every
    log line of the call, refusals included, carries it."""
    if not hasattr(request, "request_id"):
        return {}
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return {"request_id": str(request.request_id)[:128]}


@contextmanager
def _scope(method: str, request: Any, context: Context) -> Iterator[Span]:
    """The call's SERVER span (current) and log fields, for the whole call."""
    service, _, name = method.lstrip("/").rpartition("/")
    fields = _request_fields(request)
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    if fields:
        attributes["tokenrelay.request_id"] = fields["request_id"]
    carrier = context.invocation_metadata() or ()
    with (
        server_span(method.lstrip("/"), carrier, attributes) as span,
        bind(**fields, trace_id=current_trace_id()),
    ):
        yield span


# How long a handler whose caller's deadline has passed waits for gRPC to cancel it before it
# sends the status itself.
_DEADLINE_WAIT_S = 1.0


async def _fail(context: Context, span: Span, exc: Exception) -> None:
    """Map ``exc`` to the call's status (see the module docstring)."""
    if context.done():
        mark_cancelled(span)
        log.info("call ended before its handler", extra={"fields": {"error": type(exc).__name__}})
        return
    if isinstance(exc, RelayError):
        mark_error(span, outcome_of(exc), exc.message)
        code = status_of(exc)
        remaining = context.time_remaining()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and remaining is not None and remaining < 0.01:
            # The caller's own deadline has passed: gRPC ends the call with DEADLINE_EXCEEDED
            # itself and cancels this handler in a moment. A status sent now races that (and
            # fails inside gRPC, which logs it as an error); wait to be cancelled instead.
            log.info("deadline passed", extra={"fields": {"error": exc.message}})
            await asyncio.sleep(_DEADLINE_WAIT_S)
        log.info(
            "request refused", extra={"fields": {"grpc_code": code.name, "error": exc.message}}
        )
        await context.abort(code, exc.message, trailers(exc))
    mark_error(span, "failed", "internal error")
    log.error("unexpected error while serving a request", exc_info=exc)
    internal = RelayError("Internal error.")
    await context.abort(grpc.StatusCode.INTERNAL, internal.message, trailers(internal))


def _unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def unary(request: Any, context: Context) -> Any:
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        with _scope(method, request, context) as span:
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                mark_cancelled(span)
                raise
            except Exception as exc:
                await _fail(context, span, exc)
        return None

    return unary


def _server_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    async def stream(request: Any, context: Context) -> None:
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        with _scope(method, request, context) as span:
            try:
                async with aclosing(behavior(request, context)) as messages:  # type: ignore[type-var]
                    async for message in messages:
                        await context.write(message)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                mark_cancelled(span)
                raise
            except Exception as exc:
                await _fail(context, span, exc)

    return stream


def _checked_stream(iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async def checked() -> AsyncIterator[Any]:
        async for message in iterator:
            if message is _UNDECODABLE:
                await _refuse_undecodable(context)
            yield message

    return checked()


def _library(behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
    """A library servicer's behaviour (health, reflection), with decoding checked only."""
    if request_streaming:
        if inspect.isasyncgenfunction(behavior):

            async def streams(iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                async for message in behavior(_checked_stream(iterator, context), context):
                    yield message

            return streams

        async def gathers(iterator: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(_checked_stream(iterator, context), context)

        return gathers
    if inspect.isasyncgenfunction(behavior):

        async def generates(request: Any, context: Context) -> AsyncIterator[Any]:
            if request is _UNDECODABLE:
                await _refuse_undecodable(context)
            async for message in behavior(request, context):
                yield message

        return generates

    async def answers(request: Any, context: Context) -> Any:
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        return await behavior(request, context)

    return answers


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@functools.lru_cache(maxsize=512)
def wrap(method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` of ``method`` (``/package.Service/Method``) behind the border (cached: the
    servicers' handlers are the same objects call after call)."""
    streaming = (handler.request_streaming, handler.response_streaming)
    behavior: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    if method.startswith(_OURS) and not handler.request_streaming:
        # A streaming handler that is a coroutine writes with context.write already.
        generator = handler.response_streaming and inspect.isasyncgenfunction(behavior)
        wrapped = _server_stream(method, behavior) if generator else _unary(method, behavior)
    else:
        wrapped = _library(behavior, handler.request_streaming)
    factory: Any = _FACTORIES[streaming]
    return factory(  # type: ignore[no-any-return]
        wrapped,
        request_deserializer=_decoder(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class BorderInterceptor(grpc.aio.ServerInterceptor):
    """Put every method handler behind the border (see the module docstring). Place it first,
    so that refusals by later interceptors (the internal secret) are behind it too."""

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None
        return wrap(str(details.method), handler)
