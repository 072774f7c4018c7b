"""The edge's middlewares and what they rely on: request ids, API keys with per-key limits, CORS,
security headers, the one mapping from errors to HTTP — and a listening socket that slow or
numerous clients cannot exhaust.

A key's requests per minute and concurrent streams are counted in the app's ``LimitStore``
(each process's own counters, or a shared Redis: ``tokenrelay.tenancy``). The key's id, tier
and token limits, and the priority a request asks for (``X-TokenRelay-Priority: low``, ``normal``
or ``high``, capped by the tier), are forwarded to the orchestrator (``tokenrelay.tenancy.
forwarded_metadata``), which enforces token limits and priorities.

Middleware order (outermost first): ``metrics_middleware``, ``context_middleware`` (request id
bound to every log line, CORS preflight), ``error_middleware``, ``auth_middleware`` (``/v1/``
only). Headers go on every response, streamed ones included, through ``on_response_prepare``.
They live in one module so that a request passes all of them without leaving it.

Errors: every error response has the body ``{"error": {"message", "type", "param", "code"}}``:
tokenrelay errors by what their class carries (``http_status``, ``openai_type``; see
``tokenrelay.errors``), aiohttp's own HTTP errors (unknown route, wrong method, body too large)
by their status, anything else as a 500 with a fixed message (the exception is logged, never
sent).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from tokenrelay._accept import LISTEN_BACKLOG, listen
from tokenrelay.config import EdgeSettings
from tokenrelay.edge._state import AUTH, METRICS, REQUEST_ID, SETTINGS, STREAM_LEASE
from tokenrelay.errors import InvalidRequest, Overloaded, RelayError, Unauthenticated
from tokenrelay.logs import bind
from tokenrelay.security import ApiKey
from tokenrelay.tenancy import ANONYMOUS, Caller, Priority, StreamLease, current_caller
from tokenrelay.tracing import current_trace_id, mark_cancelled, mark_error, server_span

__all__ = [
    "WEBSOCKET_PATH",
    "GuardedSite",
    "admit",
    "auth_middleware",
    "authenticate",
    "bearer",
    "caller_of",
    "context_middleware",
    "error_body",
    "error_middleware",
    "error_response",
    "metrics_middleware",
    "on_response_prepare",
]

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# API responses are JSON or SSE for programs: nothing in them may be framed, sniffed or cached.
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, X-Request-Id, X-TokenRelay-Priority, Last-Event-ID"
_PRIORITY = "X-TokenRelay-Priority"
WEBSOCKET_PATH = "/v1/ws"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests by route (the route's pattern, so labels stay bounded) and status, and their
    duration (a stream's whole length)."""
    metrics = request.app[METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    began = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(route, str(status)).inc()
        metrics.duration.labels(route).observe(time.monotonic() - began)


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    attributes = {
        "http.request.method": request.method,
        "http.route": route,
        "url.path": request.path,
        "tokenrelay.request_id": request_id,
    }
    # The caller's traceparent, if any, is continued (see tokenrelay.tracing).
    name = f"{request.method} {route}"
    with (
        server_span(name, request.headers.items(), attributes) as span,
        bind(request_id=request_id, trace_id=current_trace_id()),
    ):
        response: web.StreamResponse
        try:
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                response = _preflight(request)
            else:
                response = await handler(request)
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            mark_cancelled(span)
            raise
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            mark_error(span, "error", f"HTTP {response.status}")
        return response


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    allowed = request.app[SETTINGS].cors_origins
    if origin and (origin in allowed or "*" in allowed):
        return origin
    return None


def _preflight(request: web.Request) -> web.Response:
    origin = _allowed_origin(request)
    if origin is None:
        return web.Response(status=403, text="origin not allowed")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Allow-Headers": _CORS_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    origin = _allowed_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = (
            "X-Request-Id, Retry-After, x-tokenrelay-fallback, x-tokenrelay-retrieval,"
            " x-tokenrelay-continued"
        )
        response.headers["Vary"] = "Origin"


def bearer(request: web.Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _priority(request: web.Request) -> Priority | None:
    asked = request.headers.get(_PRIORITY)
    if asked is None:
        return None
    priority = Priority.parse(asked)
    if priority is None:
        raise InvalidRequest(f"{_PRIORITY} must be low, normal or high.", param=_PRIORITY)
    return priority


def caller_of(key: ApiKey | None, priority: Priority | None = None) -> Caller:
    """Who ``key`` (None: no keys) is, as the orchestrator is told (``forwarded_metadata``)."""
    if key is None:
        return Caller(ANONYMOUS, priority=priority)
    return Caller(key.id, key.tier, key.tokens_per_minute, key.token_budget, priority)


async def authenticate(app: web.Application, presented: str | None) -> ApiKey | None:
    """The API key ``presented`` (None when the edge has no keys: every caller is let in).
    Raises ``Unauthenticated`` for a missing, wrong or revoked key. The keys file is reread
    first when it changed."""
    auth = app[AUTH]
    if not auth.store.enabled:
        return None
    if auth.store.maybe_reload():
        try:
            await asyncio.to_thread(auth.store.reload)
        except (OSError, ValueError) as exc:
            log.error(
                "keys file unreadable; keeping the previous keys",
                extra={"fields": {"error": str(exc)}},
            )
    if presented is None:
        raise Unauthenticated(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    key = auth.store.find(presented)
    if key is None:
        raise Unauthenticated("Incorrect API key provided.")
    if key.revoked:
        log.info("revoked key refused", extra={"fields": {"key_id": key.id}})
        raise Unauthenticated("This API key has been revoked.")
    return key


async def admit(app: web.Application, key: ApiKey, stream: bool = True) -> StreamLease | None:
    """Count one request against ``key``'s limits: its requests per minute, and (when it has
    one and ``stream``) a slot among its concurrent streams, returned as a lease to release when
    the request ends. Raises ``Overloaded`` (429 with a Retry-After) when a limit is reached."""
    auth = app[AUTH]
    refused = app[METRICS].refused
    wait = await auth.limits.take_request(key.id, key.requests_per_minute)
    if wait > 0:
        refused.labels(auth.tenants.label(key.id), "requests_per_minute").inc()
        raise Overloaded(
            f"Rate limit reached: {key.requests_per_minute} requests per minute for this key.",
            retry_after=wait,
            code="rate_limit_exceeded",
        )
    if not (stream and key.max_streams):
        return None
    lease = await auth.limits.open_stream(key.id, key.max_streams)
    if lease is None:
        refused.labels(auth.tenants.label(key.id), "max_streams").inc()
        raise Overloaded(
            f"Too many concurrent requests: at most {key.max_streams} for this key.",
            retry_after=1.0,
            code="rate_limit_exceeded",
        )
    return lease


_SAME_GENERATION = re.compile(r"/v1/chat/completions/[^/]+/(stream|cancel)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/") or request.path == WEBSOCKET_PATH:
        # The WebSocket authenticates itself (a browser cannot send headers there), and
        # counts each of its generations against the key's limits (``_ws``).
        return await handler(request)
    key = await authenticate(request.app, bearer(request))
    if key is None:
        token = current_caller.set(caller_of(None, _priority(request)))
        try:
            return await handler(request)
        finally:
            current_caller.reset(token)
    with bind(key_id=key.id):
        priority = _priority(request)
        # Resuming or cancelling a stream is the same generation, which holds its lease.
        same = _SAME_GENERATION.fullmatch(request.path) is not None
        request[STREAM_LEASE] = await admit(request.app, key, stream=not same)
        token = current_caller.set(caller_of(key, priority))
        try:
            return await handler(request)
        finally:
            current_caller.reset(token)
            lease = request.get(STREAM_LEASE)  # None when a resumable stream took it
            if lease is not None:
                await lease.release()


_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: 97\r\n\r\n"
    b'{"error": {"message": "Too many open connections.", "type": "server_error", '
    b'"param": null, "code": null}}'
)


class _Guarded(asyncio.Protocol):
    """Wraps aiohttp's protocol of one connection: counts it, and closes it when its first
    request's headers are not complete within the header timeout (a slow-loris client).
    Later requests on a kept-alive connection are bounded by aiohttp's keep-alive timeout."""

    def __init__(self, site: GuardedSite, inner: Any) -> None:
        self._site = site
        self._inner = inner
        self._timer: asyncio.TimerHandle | None = None
        self._seen = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        self._site.open += 1
        if self._site.open > self._site.max_connections:
            log.warning(
                "connection refused: too many open", extra={"fields": {"open": self._site.open}}
            )
            self._transport.write(_REFUSAL)
            self._transport.close()
            self._inner = None
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._site.header_timeout_s, self._too_slow)
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        log.info("connection closed: request headers too slow")
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._seen = (self._seen + data)[-4096:]
            if b"\r\n\r\n" in self._seen:
                self._timer.cancel()
                self._timer = None
                self._seen = b""
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._site.open -= 1
        if self._timer is not None:
            self._timer.cancel()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are capped and must send their headers in time."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, settings: EdgeSettings, **kwargs: Any
    ) -> None:
        kwargs.setdefault("backlog", LISTEN_BACKLOG)  # aiohttp's 128 overflowed (see _accept)
        super().__init__(runner, host, port, **kwargs)
        self.max_connections = settings.max_connections
        self.header_timeout_s = settings.header_timeout_s
        self.open = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        # Not loop.create_server: uvloop's accepts one connection a loop pass (see _accept).
        listener = await listen(
            lambda: _Guarded(self, server()),
            self._host or "",
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=bool(self._reuse_port),
        )
        self._server = listener  # type: ignore[assignment]  # BaseSite.stop only closes it
        sockets = listener.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


_HTTP_MESSAGES = {
    404: ("Not found.", "invalid_request_error", None),
    405: ("Method not allowed.", "invalid_request_error", None),
    408: ("The request body did not arrive in time.", "invalid_request_error", None),
    413: ("The request body is too large.", "invalid_request_error", "request_too_large"),
}


def error_body(exc: RelayError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.openai_type,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_response(exc: RelayError) -> web.Response:
    headers = {}
    if isinstance(exc, Overloaded) or exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after or 1)))
    return web.json_response(error_body(exc), status=exc.http_status, headers=headers)


def _http_error(exc: web.HTTPException) -> web.Response:
    message, kind, code = _HTTP_MESSAGES.get(
        exc.status,
        (exc.reason, "invalid_request_error" if exc.status < 500 else "server_error", None),
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(
        body,
        status=exc.status,
        headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RelayError as exc:
        log.info(
            "request refused", extra={"fields": {"status": exc.http_status, "error": exc.message}}
        )
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except ConnectionResetError:
        # aiohttp's "Cannot write to closing transport": the client left while its answer was
        # written, just before aiohttp cancels the handler for it. A disconnect, not an error;
        # what is sent back goes nowhere (aiohttp drops a write to a closed connection).
        transport = request.transport
        if transport is not None and not transport.is_closing():
            log.exception("unexpected error while serving a request")
            return error_response(RelayError("Internal error."))
        log.info("the client left while its answer was written")
        return web.Response(status=499)
    except Exception:
        log.exception("unexpected error while serving a request")
        return error_response(RelayError("Internal error."))
