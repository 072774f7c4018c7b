"""The gRPC border of every call the orchestrator serves: two server interceptors in one module,
the border's (``BorderInterceptor``) and the caller's (``CallerInterceptor``).

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

``CallerInterceptor`` is the internal hop's guard: who is calling, and whether they may.

Every call but health checks must come from a known caller; health checks stay open so that
orchestrators and probes (Kubernetes gRPC probes cannot send metadata) can ask, and they reveal
nothing but SERVING or not. A caller is known by, in this order:

1. the **internal secret** (``authorization: Bearer <secret>``, compared in constant time): the
   edge. It speaks for its own callers, so the identity it forwards (``x-tokenrelay-caller``:
   the API key's id, tier and token limits) is believed;
2. a **client token** of ``orchestrator.clients_file`` (a keys file like the edge's; revoked
   entries refused): a gRPC client with an identity of its own — its entry's id, tier and limits;
3. the **mTLS client certificate**, when an entry of the clients file names one of its subject
   alternative names (``san``): that entry's identity. A verified certificate that no entry
   names belongs to an internal component as before (mutual TLS alone guards the hop when no
   secret is set), so it may forward identities too.

With neither a secret nor mutual TLS configured (loopback only, ``check_exposure``), every caller
is let in, and a forwarded identity believed. Any caller may ask for a priority
(``x-tokenrelay-priority``), capped by its tier. The identity of the call is
``current_identity`` while its handler runs.

A client of the clients file (2 or 3) is held to its entry's ``requests_per_minute`` and
``max_streams`` here, as the edge holds an API key to them: every call of tokenrelay's services
(not health, not reflection) takes one request from its bucket and, while it runs, one of its
concurrent calls, in the orchestrator's limits store (Redis when ``tenancy.store`` says so, shared
by every orchestrator; else this process's, or its workers' supervisor's), under the same
store-down policy. A refusal is RESOURCE_EXHAUSTED with a retry delay (``google.rpc.RetryInfo``),
counted in ``tokenrelay_tenant_refused``. Its request and concurrent-call counters are named
``client:<id>``, apart from the edge's keys of the same id. The edge's own calls (the internal
secret's, or an internal certificate's) are not counted: the edge counted them against their API
key already. Its tokens per minute and budget are charged by the relay under its id, as an API
key's are (so a client and an API key of one id share those, and its labels and ledger rows:
give clients ids of their own).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc
from opentelemetry.trace import Span

from tokenrelay.errors import Overloaded, RelayError
from tokenrelay.logs import bind
from tokenrelay.metrics import outcome_of
from tokenrelay.security import ApiKey, KeyStore, Secret
from tokenrelay.tenancy import (
    Caller,
    Identity,
    LimitStore,
    StreamLease,
    TenantMetrics,
    Tenants,
    requested_priority,
)
from tokenrelay.tracing import current_trace_id, mark_cancelled, mark_error, server_span
from tokenrelay.wire import status_of, trailers

__all__ = ["CLIENT_PREFIX", "BorderInterceptor", "CallerInterceptor", "current_identity"]

log = logging.getLogger(__name__)

_OURS = "/tokenrelay."  # tokenrelay's own services (not health, not reflection)
_UNDECODABLE_MESSAGE = "The request message could not be decoded (malformed protobuf)."

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)


class _Undecodable:
    """What the request deserializer returns for bytes that are not a request message."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _decode(deserialize: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return deserialize(raw)
    except Exception:  # DecodeError, and whatever else a malformed message may raise
        return _UNDECODABLE


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The request deserializer of a library servicer's handler (health, reflection)."""
    if deserialize is None:
        return None
    return functools.partial(_decode, deserialize)


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


def _scope(
    method: str, request: Any, context: Context
) -> tuple[str, Any, dict[str, str], dict[str, str]]:
    """What the call's SERVER span (current for the whole call) and log fields are made of: its
    name, the carrier of the caller's ``traceparent``, its attributes, and the log fields."""
    service, _, name = method.lstrip("/").rpartition("/")
    fields = _request_fields(request)
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    if fields:
        attributes["tokenrelay.request_id"] = fields["request_id"]
    return method.lstrip("/"), context.invocation_metadata() or (), attributes, fields


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


def _unary(
    method: str, behavior: Callable[..., Awaitable[Any]], deserialize: Callable[[bytes], Any]
) -> Callable[..., Any]:
    async def unary(raw: bytes, context: Context) -> Any:
        request = _decode(deserialize, raw)
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        name, carrier, attributes, fields = _scope(method, request, context)
        with (
            server_span(name, carrier, attributes) as span,
            bind(**fields, trace_id=current_trace_id()),
        ):
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


def _server_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], deserialize: Callable[[bytes], Any]
) -> Callable[..., Any]:
    async def stream(raw: bytes, context: Context) -> None:
        request = _decode(deserialize, raw)
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        name, carrier, attributes, fields = _scope(method, request, context)
        with (
            server_span(name, carrier, attributes) as span,
            bind(**fields, trace_id=current_trace_id()),
        ):
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
    deserialize = handler.request_deserializer
    if method.startswith(_OURS) and not handler.request_streaming and deserialize is not None:
        # A streaming handler that is a coroutine writes with context.write already. The
        # wrapper decodes the request itself (gRPC hands it the bytes): one step of the call.
        generator = handler.response_streaming and inspect.isasyncgenfunction(behavior)
        make = _server_stream if generator else _unary
        wrapped, deserialize = make(method, behavior, deserialize), None
    else:
        wrapped = _library(behavior, handler.request_streaming)
        deserialize = _decoder(deserialize)
    factory: Any = _FACTORIES[streaming]
    return factory(  # type: ignore[no-any-return]
        wrapped,
        request_deserializer=deserialize,
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


_OPEN = ("/grpc.health.v1.Health/",)
CLIENT_PREFIX = "client:"
_REFUSAL = "This call needs the internal secret or a client token (authorization metadata)."
_INTERNAL_CALLER = Caller("internal")

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "tokenrelay_identity", default=None
)


def _client(key: ApiKey, metadata: Mapping[str, str | bytes]) -> Caller:
    return Caller(
        key.id, key.tier, key.tokens_per_minute, key.token_budget, requested_priority(metadata)
    )


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler but health's with the check above (see the module docstring).
    Place it after the border interceptor, so that its refusals are behind the border."""

    def __init__(
        self,
        tenants: Tenants,
        secret: Secret | None = None,
        clients: KeyStore | None = None,
        mutual_tls: bool = False,
        limits: LimitStore | None = None,
        metrics: TenantMetrics | None = None,
    ) -> None:
        """``limits``: where clients' requests and concurrent calls are counted (None: they
        are not); ``metrics``: where refusals are counted."""
        self._tenants = tenants
        self._limits = limits
        self._metrics = metrics
        self._secret = secret
        self._clients = clients if clients is not None and clients.enabled else None
        self._mutual = mutual_tls
        self._open = secret is None and not mutual_tls and self._clients is None
        self._wrap = functools.lru_cache(maxsize=512)(self._guarded)

    async def _reload(self) -> None:
        clients = self._clients
        if clients is not None and clients.maybe_reload():
            try:
                await asyncio.to_thread(clients.reload)
            except (OSError, ValueError) as exc:
                log.error(
                    "clients file unreadable; keeping the previous clients",
                    extra={"fields": {"error": str(exc)}},
                )

    def _by_certificate(self, context: Context) -> ApiKey | None:
        if self._clients is None:
            return None
        names = {
            bytes(v).decode(errors="replace")
            for v in context.auth_context().get("x509_subject_alternative_name", ())
        }
        return self._clients.find_san(names) if names else None

    async def _identify(self, context: Context) -> tuple[Identity, ApiKey | None] | None:
        """The identity of the call's caller and, for a client of the clients file, its entry;
        None when it is not known."""
        metadata: dict[str, str | bytes] = dict(context.invocation_metadata() or ())
        raw = metadata.get("authorization", "")
        scheme, _, token = (raw if isinstance(raw, str) else "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if self._open:
            return self._forwarded(metadata)
        if token and self._secret is not None and self._secret.matches(token):
            return self._forwarded(metadata)
        await self._reload()
        if token and self._clients is not None:
            key = self._clients.find(token)
            if key is not None and not key.revoked:
                return self._tenants.identify(_client(key, metadata)), key
        if self._mutual:
            key = self._by_certificate(context)
            if key is not None and not key.revoked:
                return self._tenants.identify(_client(key, metadata)), key
            if self._secret is None and key is None:  # an internal component, as before
                return self._forwarded(metadata)
        return None

    def _forwarded(self, metadata: Mapping[str, str | bytes]) -> tuple[Identity, None]:
        """The caller the metadata forwards (``internal`` when none): one call to tenancy."""
        return self._tenants.forwarded(metadata, _INTERNAL_CALLER), None

    async def _admit(self, method: str, context: Context) -> StreamLease | None:
        """Identify the call's caller (refused when unknown) and count it against its limits
        when it is a client of the file; the lease of its concurrent call, to release when the
        call ends (None when none was taken)."""
        known = await self._identify(context)
        if known is None:
            log.warning(
                "call refused: no or wrong credentials", extra={"fields": {"method": method}}
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
            return None
        identity, client = known
        current_identity.set(identity)
        if client is None or self._limits is None or not method.startswith(_OURS):
            return None
        return await self._count(client, identity)

    async def _count(self, client: ApiKey, identity: Identity) -> StreamLease | None:
        """Take one request and (when the entry limits them) one concurrent call of
        ``client``; raises ``Overloaded`` when a limit is reached, ``LimitsUnavailable`` when
        the store cannot count and the policy is to fail closed."""
        assert self._limits is not None
        name = CLIENT_PREFIX + client.id
        wait = await self._limits.take_request(name, client.requests_per_minute)
        if wait > 0:
            self._refused(identity, "requests_per_minute")
            raise Overloaded(
                f"Rate limit reached: {client.requests_per_minute} requests per minute for"
                f" the client {client.id!r}.",
                retry_after=wait,
                code="rate_limit_exceeded",
            )
        if not client.max_streams:
            return None
        lease = await self._limits.open_stream(name, client.max_streams)
        if lease is None:
            self._refused(identity, "max_streams")
            raise Overloaded(
                f"Too many concurrent calls: at most {client.max_streams} for the client"
                f" {client.id!r}.",
                retry_after=1.0,
                code="rate_limit_exceeded",
            )
        return lease

    def _refused(self, identity: Identity, limit: str) -> None:
        if self._metrics is not None:
            self._metrics.refused.labels(identity.label, identity.tier, limit).inc()
        log.info(
            "call refused: client limit reached",
            extra={"fields": {"key_id": identity.key_id, "limit": limit}},
        )

    def _guarded(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        behavior: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        admit = functools.partial(self._admit, method)
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):

            async def generates(request: Any, context: Context) -> AsyncIterator[Any]:
                lease = await admit(context)
                try:
                    async with aclosing(behavior(request, context)) as messages:
                        async for message in messages:
                            yield message
                finally:
                    if lease is not None:
                        await lease.release()

            wrapped = generates
        else:

            async def answers(request: Any, context: Context) -> Any:
                lease = await admit(context)
                try:
                    return await behavior(request, context)
                finally:
                    if lease is not None:
                        await lease.release()

            wrapped = answers
        factory: Any = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(  # type: ignore[no-any-return]
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or method.startswith(_OPEN):
            return handler
        return self._wrap(method, handler)
