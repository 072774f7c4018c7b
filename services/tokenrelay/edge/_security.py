"""What stands between the public and the API: request ids, API keys with per-key limits, CORS,
security headers, and a listening socket that slow or numerous clients cannot exhaust.

A key's requests per minute and concurrent streams are counted in the app's ``LimitStore``
(each process's own counters, or a shared Redis: ``tokenrelay.tenancy``). The key's id, tier
and token limits, and the priority a request asks for (``X-TokenRelay-Priority: low``, ``normal``
or ``high``, capped by the tier), are forwarded to the orchestrator (``tokenrelay.tenancy.
forwarded_metadata``), which enforces token limits and priorities.

Middleware order (outermost first): ``context_middleware`` (request id bound to every log line,
CORS preflight), the error middleware, ``auth_middleware`` (``/v1/`` only). Headers go on every
response, streamed ones included, through ``on_response_prepare``.
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

from tokenrelay.config import EdgeSettings
from tokenrelay.edge._state import AUTH, METRICS, REQUEST_ID, SETTINGS
from tokenrelay.errors import InvalidRequest, Overloaded, Unauthenticated
from tokenrelay.logs import bind
from tokenrelay.security import ApiKey
from tokenrelay.tenancy import ANONYMOUS, Caller, Priority, current_caller
from tokenrelay.tracing import current_trace_id, mark_cancelled, mark_error, server_span

__all__ = [
    "GuardedSite",
    "auth_middleware",
    "context_middleware",
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
_CORS_HEADERS = "Authorization, Content-Type, X-Request-Id, X-TokenRelay-Priority"
_PRIORITY = "X-TokenRelay-Priority"


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
            "X-Request-Id, Retry-After, x-tokenrelay-fallback, x-tokenrelay-retrieval"
        )
        response.headers["Vary"] = "Origin"


def _bearer(request: web.Request) -> str | None:
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


def _caller(key: ApiKey | None, priority: Priority | None) -> Caller:
    if key is None:
        return Caller(ANONYMOUS, priority=priority)
    return Caller(key.id, key.tier, key.tokens_per_minute, key.token_budget, priority)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app[AUTH]
    if not request.path.startswith("/v1/"):
        return await handler(request)
    if not auth.store.enabled:
        token = current_caller.set(_caller(None, _priority(request)))
        try:
            return await handler(request)
        finally:
            current_caller.reset(token)
    if auth.store.maybe_reload():
        try:
            await asyncio.to_thread(auth.store.reload)
        except (OSError, ValueError) as exc:
            log.error(
                "keys file unreadable; keeping the previous keys",
                extra={"fields": {"error": str(exc)}},
            )
    presented = _bearer(request)
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
    with bind(key_id=key.id):
        priority = _priority(request)
        refused = request.app[METRICS].refused
        wait = await auth.limits.take_request(key.id, key.requests_per_minute)
        if wait > 0:
            refused.labels(auth.tenants.label(key.id), "requests_per_minute").inc()
            raise Overloaded(
                f"Rate limit reached: {key.requests_per_minute} requests per minute for this key.",
                retry_after=wait,
                code="rate_limit_exceeded",
            )
        lease = await auth.limits.open_stream(key.id, key.max_streams) if key.max_streams else None
        if key.max_streams and lease is None:
            refused.labels(auth.tenants.label(key.id), "max_streams").inc()
            raise Overloaded(
                f"Too many concurrent requests: at most {key.max_streams} for this key.",
                retry_after=1.0,
                code="rate_limit_exceeded",
            )
        token = current_caller.set(_caller(key, priority))
        try:
            return await handler(request)
        finally:
            current_caller.reset(token)
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
        super().__init__(runner, host, port, **kwargs)
        self.max_connections = settings.max_connections
        self.header_timeout_s = settings.header_timeout_s
        self.open = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Guarded(self, server()),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
