"""``GET /v1/ws``: chat completions over one WebSocket, for browsers.

One socket carries any number of generations at once (up to ``[edge.websocket]
max_generations``), each named by an id its caller chooses. Messages are JSON text frames:

client → server::

    {"type": "auth", "api_key": "..."}                  first, when keys are on and the
                                                        upgrade carried no Authorization header
    {"type": "chat.completions.create", "id": "a1",     a chat completions body, always streamed
     "body": {...}}                                     (stream_options.include_usage honoured)
    {"type": "cancel", "id": "a1"}                      stops that generation, at Triton too

server → client::

    {"type": "chunk", "id": "a1", "data": {...}}        a chat.completion.chunk, as over SSE
    {"type": "done", "id": "a1"}                        the answer is complete ("cancelled":
                                                        true after a cancel)
    {"type": "error", "id": "a1", "error": {...}}       an OpenAI error object; that generation
                                                        ended (id null: about a message that
                                                        named none, or could not be read)

Authentication is the HTTP API's: an ``Authorization: Bearer`` header on the upgrade (a wrong
one gets 401 before any upgrade), or — browsers cannot set headers on a WebSocket — an ``auth``
message first, due within ``header_timeout_s``; without it the socket closes with 1008 (policy
violation) and the reason. Each generation counts against the key's limits as an HTTP request
does (requests per minute, concurrent streams); messages larger than ``max_body_bytes`` close
the socket with 1009 (too big); a malformed message gets an ``error`` and the socket stays
usable. The server pings every ``keepalive_interval_s`` and closes a socket whose client stops
answering. A browser on another origin may open the socket only when ``cors_origins`` allows
it (the upgrade gets 403 otherwise: no page may use a local, keyless edge behind its user's
back). On SIGTERM running generations finish (within the drain grace), new ones are refused,
and the socket closes with 1001.

The chunks are the SSE endpoint's (``_stream``'s shapes and pump); only the framing differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tokenrelay.edge import _openai as oa
from tokenrelay.edge._generate import budget
from tokenrelay.edge._middlewares import (
    WEBSOCKET_PATH,
    admit,
    authenticate,
    bearer,
    caller_of,
    error_body,
)
from tokenrelay.edge._state import AUTH, REQUEST_ID, SETTINGS, STATE, UPSTREAM
from tokenrelay.edge._stream import TextChunk, open_answer, pump
from tokenrelay.errors import (
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RelayError,
    Unauthenticated,
    UpstreamUnavailable,
)
from tokenrelay.logs import bind
from tokenrelay.security import ApiKey
from tokenrelay.tenancy import current_caller
from tokenrelay.tracing import inject

__all__ = ["Session", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_MAX_ID_CHARS = 128


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _check_origin(request: web.Request) -> None:
    """A browser page may open the socket from this origin, or one ``cors_origins`` allows;
    clients that are not browsers send no Origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = request.app[SETTINGS].cors_origins
    same = origin.split("://", 1)[-1] == request.host
    if not (same or origin in allowed or "*" in allowed):
        raise PermissionDenied("This origin may not open a WebSocket here.")


class _Generation:
    """One generation's messages on the socket (a ``_stream.Sink`` of chunk objects)."""

    __slots__ = ("_id", "_session")

    def __init__(self, session: Session, generation_id: str) -> None:
        self._session = session
        self._id = generation_id

    @staticmethod
    def frame(payload: dict[str, Any] | TextChunk) -> dict[str, Any]:
        return payload.payload() if isinstance(payload, TextChunk) else payload

    async def write(self, frames: list[dict[str, Any]]) -> None:
        for chunk in frames:
            await self._session.send({"type": "chunk", "id": self._id, "data": chunk})

    async def ping(self) -> None:
        pass  # the socket's own pings keep it alive

    async def fail(self, body: dict[str, Any]) -> None:
        await self._session.send({"type": "error", "id": self._id, "error": body["error"]})

    async def done(self) -> None:
        await self._session.send({"type": "done", "id": self._id})


class Session:
    """One socket: its caller's key, its running generations, and the messages it reads."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, key: ApiKey | None):
        self._request = request
        self._ws = ws
        self._key = key
        self._authenticated = key is not None or not request.app[AUTH].store.enabled
        self._running: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self._draining = False

    async def send(self, message: dict[str, Any]) -> None:
        """One message to the client (in order: one writer at a time). Raises
        ``ConnectionError`` when the socket is gone."""
        async with self._send_lock:
            await self._ws.send_str(_dumps(message))

    async def _error(self, generation_id: str | None, exc: RelayError) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the socket is gone
            await self.send(
                {"type": "error", "id": generation_id, "error": error_body(exc)["error"]}
            )

    async def run(self) -> None:
        """Read messages until the client closes the socket (or it fails); every generation
        still running is cancelled then."""
        settings = self._request.app[SETTINGS]
        try:
            if not self._authenticated and not await self._wait_for_auth(settings.header_timeout_s):
                return
            async for message in self._ws:
                if message.type is WSMsgType.TEXT:
                    await self._handle(message.data)
                elif message.type is WSMsgType.BINARY:
                    await self._error(
                        None, InvalidRequest("Send JSON text messages, not binary ones.")
                    )
                # ERROR (a message too big, a broken frame): aiohttp has closed the socket.
        finally:
            await self._cancel_all()

    async def _wait_for_auth(self, timeout_s: float) -> bool:
        """The ``auth`` message a browser sends first; closes the socket (1008) without it."""
        try:
            async with asyncio.timeout(timeout_s):
                message = await self._ws.receive()
        except TimeoutError:
            await self._close_unauthenticated(
                Unauthenticated("No 'auth' message in time.", code="missing_api_key")
            )
            return False
        if message.type is not WSMsgType.TEXT:
            return False  # closed, or an error aiohttp has answered already
        try:
            parsed = oa.loads(message.data.encode())
            if parsed.get("type") != "auth" or not isinstance(parsed.get("api_key"), str):
                raise Unauthenticated(
                    'Authenticate first: {"type": "auth", "api_key": "<key>"}.',
                    code="missing_api_key",
                )
            self._key = await authenticate(self._request.app, parsed["api_key"])
        except (Unauthenticated, InvalidRequest) as exc:
            await self._close_unauthenticated(exc)
            return False
        self._authenticated = True
        return True

    async def _close_unauthenticated(self, exc: RelayError) -> None:
        await self._error(None, exc)
        await self._ws.close(code=WSCloseCode.POLICY_VIOLATION, message=exc.message.encode()[:120])

    async def _handle(self, text: str) -> None:
        try:
            message = oa.loads(text.encode())
        except InvalidRequest as exc:
            await self._error(None, InvalidRequest(f"The message is not valid: {exc.message}"))
            return
        kind, generation_id = message.get("type"), message.get("id")
        valid_id = (
            generation_id if isinstance(generation_id, str) and generation_id.strip() else None
        )
        if kind == "auth":
            if self._request.app[AUTH].store.enabled:
                await self._error(None, InvalidRequest("This socket is authenticated already."))
            return
        if valid_id is None or len(valid_id) > _MAX_ID_CHARS:
            await self._error(
                None,
                InvalidRequest(
                    f"'id' must be a non-empty string of at most {_MAX_ID_CHARS} characters.",
                    "id",
                ),
            )
            return
        if kind == "chat.completions.create":
            await self._create(valid_id, message.get("body"))
        elif kind == "cancel":
            await self._cancel(valid_id)
        else:
            await self._error(
                valid_id,
                InvalidRequest(
                    "'type' must be 'chat.completions.create', 'cancel' or 'auth'.", "type"
                ),
            )

    async def _create(self, generation_id: str, body: object) -> None:
        settings = self._request.app[SETTINGS]
        if generation_id in self._running:
            await self._error(
                generation_id, InvalidRequest("A generation with this id is running.", "id")
            )
        elif not isinstance(body, dict):
            await self._error(
                generation_id, InvalidRequest("'body' must be a chat completions body.", "body")
            )
        elif self._draining or self._request.app[STATE].draining:
            await self._error(
                generation_id, UpstreamUnavailable("The server is shutting down; reconnect.")
            )
        elif len(self._running) >= settings.websocket.max_generations:
            limit = settings.websocket.max_generations
            await self._error(
                generation_id,
                Overloaded(f"At most {limit} generations may run at once on one socket."),
            )
        else:
            task = asyncio.create_task(self._generate(generation_id, body))
            self._running[generation_id] = task

    async def _generate(self, generation_id: str, body: dict[str, Any]) -> None:
        """One generation, start to end; its errors go to the client as ``error`` messages."""
        app = self._request.app
        settings = app[SETTINGS]
        request_id = uuid.uuid4().hex
        lease = None
        try:
            with bind(request_id=request_id, ws_id=generation_id):
                try:
                    if self._key is not None:
                        lease = await admit(app, self._key)
                    current_caller.set(caller_of(self._key))
                    parsed = oa.parse_chat(body, request_id)
                    messages = app[UPSTREAM].stream(
                        parsed.request,
                        budget(self._request, settings),
                        metadata=[("x-request-id", request_id), *inject()],
                    )
                    try:
                        opened = await open_answer(messages, parsed, True, request_id)
                        await pump(
                            _Generation(self, generation_id),
                            messages,
                            opened.shape,
                            opened.first,
                            parsed.include_usage,
                            opened.retrieval,
                            settings.keepalive_interval_s,
                        )
                    finally:
                        await messages.aclose()
                except RelayError as exc:
                    await self._error(generation_id, exc)
                except (ConnectionError, RuntimeError):  # the socket closed under us
                    pass
                except Exception:  # a bug: the client still hears that its generation ended
                    log.exception("websocket generation failed")
                    await self._error(generation_id, RelayError("Internal error."))
        finally:
            if lease is not None:
                await lease.release()
            if self._running.get(generation_id) is asyncio.current_task():
                del self._running[generation_id]
            await self._close_if_drained()

    async def _cancel(self, generation_id: str) -> None:
        task = self._running.pop(generation_id, None)
        if task is None:
            await self._error(
                generation_id, InvalidRequest("No generation with this id is running.", "id")
            )
            return
        task.cancel()  # closes its stream: the gRPC call, then the Triton request, are cancelled
        await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send({"type": "done", "id": generation_id, "cancelled": True})
        await self._close_if_drained()

    async def _cancel_all(self) -> None:
        tasks = list(self._running.values())
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """The edge is shutting down: refuse new generations, close once the running ones end
        (now, when none runs)."""
        self._draining = True
        await self._close_if_drained()

    async def _close_if_drained(self) -> None:
        if self._draining and not self._running and not self._ws.closed:
            await self._ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


@routes.get(WEBSOCKET_PATH)
async def websocket(request: web.Request) -> web.WebSocketResponse:
    """The WebSocket API (this module's docstring says its messages)."""
    settings = request.app[SETTINGS]
    _check_origin(request)
    presented = bearer(request)
    key = await authenticate(request.app, presented) if presented is not None else None
    ws = web.WebSocketResponse(
        heartbeat=settings.keepalive_interval_s, max_msg_size=settings.max_body_bytes
    )
    await ws.prepare(request)
    session = Session(request, ws, key)
    sockets = request.app[STATE].sockets
    sockets.add(session)
    try:
        with bind(key_id=key.id if key is not None else "", socket=request[REQUEST_ID]):
            await session.run()
    finally:
        sockets.discard(session)
    return ws
