"""Frames: the edge → orchestrator hop for streamed generations, without gRPC's machinery.

A grpc.aio call passes every event through gRPC's own threads and the completion queue before
the event loop sees it. On one host, loopback, that is most of what a hop costs:
``benchmarks/grpc_hops.py`` measured a bare grpc.aio hop at ~0.6 to 1.2 ms to the first message
and a relaying process at ~60 to 90 µs of CPU per message, where the same hop as length-prefixed
frames on the event loop alone took ~0.1 to 0.4 ms and ~3 to 7 µs. The relay's added time to
first token and its CPU per token are made of such hops, so the edge can call ``GenerateStream``
this way (``edge.orchestrator_frames``, served on ``orchestrator.frames_listen``); everything
else, and every other client, speaks gRPC.

The protocol, on a TCP connection that carries one call at a time (the edge keeps idle ones for
the next call, so per-call flow control is TCP's own and a cancelled call is a closed
connection). Each frame is a kind (1 byte), a payload length (4 bytes, little-endian) and the
payload:

- ``CALL`` (client): the method (``/tokenrelay.v1.GenerationService/GenerateStream``), the time
  left (seconds, float64; negative: none), the metadata, then the request message's bytes;
- ``HEADERS`` (server, optional): the call's initial metadata;
- ``MESSAGE`` (server): one response message's bytes;
- ``END`` (server): the gRPC status code, its message and the trailing metadata (where
  ``grpc-status-details-bin`` carries tokenrelay's error details, as on gRPC: ``tokenrelay.wire``).

A client that goes away, or that sends anything else mid-call, cancels the call; the server
cancels it at its deadline too. Metadata are (key, value) pairs, a value text or, for keys ending
in ``-bin`` as in gRPC, bytes. The server runs the method's handler exactly as gRPC does, behind
the same interceptors (``BorderInterceptor``, ``CallerInterceptor``: decoding, spans, log fields,
credentials, the caller's limits, the error mapping), with a context offering what those use of
``grpc.aio.ServicerContext``; the client raises ``grpc.aio.AioRpcError`` for a failed call, so
the edge's error mapping is the one of its gRPC calls. There is no TLS: the address must be
loopback (``check_exposure``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from grpc.aio import Metadata

from ._accept import Listener, listen

__all__ = [
    "CALL",
    "END",
    "HEADERS",
    "MAX_FRAME",
    "MESSAGE",
    "FrameConnection",
    "FramesClient",
    "FramesServer",
    "ProtocolError",
    "decode_call",
    "decode_end",
    "decode_metadata",
    "encode_call",
    "encode_end",
    "encode_metadata",
]

log = logging.getLogger(__name__)

CALL, HEADERS, MESSAGE, END = 1, 2, 3, 4
_HEADER = struct.Struct("<BI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
MAX_FRAME = 16 * 1024 * 1024  # as gRPC's receive cap on the orchestrator (whole documents)
_CODES = {code.value[0]: code for code in grpc.StatusCode}

MetadataPairs: TypeAlias = Sequence[tuple[str, str | bytes]]


class ProtocolError(ValueError):
    """A frame or payload that does not follow the protocol: the connection is closed."""


def encode_metadata(metadata: MetadataPairs) -> bytes:
    parts = [_U16.pack(len(metadata))]
    for key, value in metadata:
        raw_key = key.encode()
        raw = value if isinstance(value, bytes) else value.encode()
        parts += [_U16.pack(len(raw_key)), raw_key, _U32.pack(len(raw)), raw]
    return b"".join(parts)


def decode_metadata(
    data: bytes | memoryview, offset: int = 0
) -> tuple[tuple[tuple[str, Any], ...], int]:
    """The metadata at ``offset`` and the offset after it; raises ``ProtocolError``."""
    try:
        (count,) = _U16.unpack_from(data, offset)
        offset += 2
        pairs = []
        for _ in range(count):
            (size,) = _U16.unpack_from(data, offset)
            key = bytes(data[offset + 2 : offset + 2 + size]).decode()
            offset += 2 + size
            (size,) = _U32.unpack_from(data, offset)
            raw = bytes(data[offset + 4 : offset + 4 + size])
            if len(raw) != size:
                raise ProtocolError("metadata value cut short")
            offset += 4 + size
            pairs.append((key, raw if key.endswith("-bin") else raw.decode()))
        return tuple(pairs), offset
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed metadata: {exc}") from None


def encode_call(
    method: str, timeout_s: float | None, metadata: MetadataPairs, request: bytes
) -> bytes:
    return _call(method.encode(), timeout_s, encode_metadata(metadata), request)


def _call(raw_method: bytes, timeout_s: float | None, raw_metadata: bytes, request: bytes) -> bytes:
    left = -1.0 if timeout_s is None else max(timeout_s, 0.0)
    return b"".join(
        (_U16.pack(len(raw_method)), raw_method, _F64.pack(left), raw_metadata, request)
    )


def decode_call(
    data: bytes,
) -> tuple[str, float | None, tuple[tuple[str, Any], ...], bytes]:
    """method, time left (None: no deadline), metadata, request bytes."""
    try:
        (size,) = _U16.unpack_from(data, 0)
        method = data[2 : 2 + size].decode()
        (left,) = _F64.unpack_from(data, 2 + size)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed call: {exc}") from None
    metadata, offset = decode_metadata(data, 2 + size + 8)
    return method, None if left < 0 or math.isnan(left) else left, metadata, data[offset:]


def encode_end(code: grpc.StatusCode, details: str, metadata: MetadataPairs) -> bytes:
    raw = details.encode()
    return b"".join((bytes((code.value[0],)), _U32.pack(len(raw)), raw, encode_metadata(metadata)))


def decode_end(data: bytes) -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
    try:
        code = _CODES[data[0]]
        (size,) = _U32.unpack_from(data, 1)
        details = data[5 : 5 + size].decode()
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed end: {exc}") from None
    metadata, _ = decode_metadata(data, 5 + size)
    return code, details, metadata


class FrameConnection(asyncio.Protocol):
    """One connection's frames in and out. ``on_frame(kind, payload)`` sees each frame that
    arrives, ``on_lost()`` the connection's end (either side's, or a protocol error)."""

    def __init__(
        self,
        on_frame: Callable[[int, bytes], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer and len(data) >= _HEADER.size:  # the usual case: whole frames, no copy
            kind, size = _HEADER.unpack_from(data)
            if len(data) == _HEADER.size + size and size <= MAX_FRAME:
                self._deliver(kind, data[_HEADER.size :])
                return
        buffer += data
        offset = 0
        while len(buffer) - offset >= _HEADER.size and not self.closed:
            kind, size = _HEADER.unpack_from(buffer, offset)
            if size > MAX_FRAME:
                self._fail(f"a frame of {size} bytes (at most {MAX_FRAME})")
                return
            end = offset + _HEADER.size + size
            if end > len(buffer):
                break
            self._deliver(kind, bytes(buffer[offset + _HEADER.size : end]))
            offset = end
        del buffer[:offset]

    def _deliver(self, kind: int, payload: bytes) -> None:
        if self.on_frame is None:  # nothing expects a frame now (an idle connection)
            self._fail("a frame while idle")
            return
        try:
            self.on_frame(kind, payload)
        except ProtocolError as exc:
            self._fail(str(exc))

    def _fail(self, why: str) -> None:
        log.warning("frames connection closed: protocol error", extra={"fields": {"error": why}})
        self.close()

    def send(self, kind: int, payload: bytes = b"") -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_HEADER.pack(kind, len(payload)) + payload)

    async def drain(self) -> None:
        """Wait while the peer reads slower than we write (TCP's flow control)."""
        if self._paused is not None:
            await asyncio.shield(self._paused)

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        if self.on_lost is not None:
            self.on_lost()


class _AbortError(grpc.aio.AbortError):
    pass


class _Context:
    """What tokenrelay's handlers and interceptors use of ``grpc.aio.ServicerContext``."""

    def __init__(
        self,
        connection: FrameConnection,
        metadata: tuple[tuple[str, Any], ...],
        deadline: float | None,
        serialize: Callable[[Any], bytes],
    ) -> None:
        self._connection = connection
        self._metadata = metadata
        self._deadline = deadline
        self._serialize = serialize
        self._trailing: tuple[tuple[str, Any], ...] = ()
        self.status: tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]] | None = None
        self.over = False

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no TLS on this hop

    def peer(self) -> str:
        transport = self._connection.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return f"frames:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "frames"

    def done(self) -> bool:
        return self.over

    def cancelled(self) -> bool:
        return self.over and self.status is None

    async def write(self, message: Any) -> None:
        if self.over:
            raise asyncio.CancelledError
        self._connection.send(MESSAGE, self._serialize(message))
        await self._connection.drain()

    async def send_initial_metadata(self, metadata: MetadataPairs) -> None:
        self._connection.send(HEADERS, encode_metadata(metadata))

    def set_trailing_metadata(self, metadata: MetadataPairs) -> None:
        self._trailing = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: MetadataPairs = ()
    ) -> None:
        self.status = (code, details, tuple(trailing_metadata) or self._trailing)
        raise _AbortError()

    @property
    def trailing(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


Handler: TypeAlias = Callable[[bytes, Any], Awaitable[None]]


class FramesServer:
    """Serves ``handlers`` (method → (the method's handler behind the interceptors, taking the
    request's bytes and a context, writing with ``context.write``; the response serializer)) on
    ``host:port``. At most ``max_calls`` at once: a call past them is refused with
    RESOURCE_EXHAUSTED, as gRPC's ``maximum_concurrent_rpcs`` refuses it."""

    def __init__(
        self, handlers: dict[str, tuple[Handler, Callable[[Any], bytes]]], max_calls: int
    ) -> None:
        self._handlers = handlers
        self._max_calls = max_calls
        self._server: Listener | None = None
        self._connections: set[FrameConnection] = set()
        self._calls: set[asyncio.Task[None]] = set()
        self._accepting = True
        self.port = 0

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        # One connection per concurrent stream: a burst of hundreds of streams (see _accept).
        self._server = await listen(self._connection, host, port, reuse_port=reuse_port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _connection(self) -> FrameConnection:
        connection = FrameConnection()
        self._connections.add(connection)
        self._await_call(connection)
        return connection

    def _await_call(self, connection: FrameConnection) -> None:
        """Between calls: the next frame must be a call; a lost connection is forgotten."""
        connection.on_frame = lambda kind, payload: self._begin(connection, kind, payload)
        connection.on_lost = lambda: self._connections.discard(connection)

    def _begin(self, connection: FrameConnection, kind: int, payload: bytes) -> None:
        if kind != CALL:
            raise ProtocolError(f"frame kind {kind} where a call was expected")
        method, left, metadata, request = decode_call(payload)
        entry = self._handlers.get(method)
        if entry is None:
            connection.send(END, encode_end(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ()))
            return
        if not self._accepting:
            connection.send(
                END, encode_end(grpc.StatusCode.UNAVAILABLE, "The server is stopping.", ())
            )
            return
        if len(self._calls) >= self._max_calls:
            connection.send(
                END,
                encode_end(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", ()
                ),
            )
            return
        handler, serialize = entry
        deadline = None if left is None else time.monotonic() + left
        context = _Context(connection, metadata, deadline, serialize)
        task = asyncio.get_running_loop().create_task(
            self._run(connection, context, handler, request)
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

        def cancel(kind: int = 0, payload: bytes = b"") -> None:  # anything mid-call, or the end
            if not context.over:
                context.over = True
                task.cancel()

        connection.on_frame = cancel

        def lost() -> None:
            self._connections.discard(connection)
            cancel()

        connection.on_lost = lost
        if deadline is not None:
            timer = asyncio.get_running_loop().call_later(
                max(left or 0.0, 0.0), self._expire, connection, context, task
            )
            task.add_done_callback(lambda _: timer.cancel())

    @staticmethod
    def _expire(connection: FrameConnection, context: _Context, task: asyncio.Task[None]) -> None:
        if context.over:
            return
        context.over = True
        task.cancel()
        connection.send(END, encode_end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ()))
        connection.close()

    async def _run(
        self, connection: FrameConnection, context: _Context, handler: Handler, request: bytes
    ) -> None:
        try:
            await handler(request, context)
            status = (grpc.StatusCode.OK, "", context.trailing)
        except _AbortError:
            assert context.status is not None
            status = context.status
        except asyncio.CancelledError:
            return  # the client left or the deadline passed: nobody to answer
        except Exception:
            log.exception("frames call failed")
            status = (grpc.StatusCode.UNKNOWN, "Unexpected error in the handler.", ())
        if context.over:  # cancelled while it ended: the connection is going
            return
        context.over = True
        connection.send(END, encode_end(*status))
        if not connection.closed:  # ready for the connection's next call
            self._await_call(connection)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those running finish for up to ``grace_s``, cancel the rest
        and close every connection."""
        self._accepting = False
        if self._server is not None:
            self._server.close()
        calls = list(self._calls)
        if calls:
            _, pending = await asyncio.wait(calls, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()


def _failed(
    code: grpc.StatusCode, details: str, trailing: MetadataPairs = ()
) -> grpc.aio.AioRpcError:
    """A failed call as grpc.aio reports one (no initial metadata on this hop)."""
    return grpc.aio.AioRpcError(code, Metadata(), Metadata(*trailing), details)


class FramesClient:
    """Calls over frames to ``host:port``, one at a time per connection; up to ``keep_idle``
    idle connections are kept for the next calls. Create and close it in its event loop."""

    def __init__(self, host: str, port: int, keep_idle: int = 64) -> None:
        self._host = host
        self._port = port
        self._keep = keep_idle
        self._idle: deque[FrameConnection] = deque()
        self._closed = False
        self._ending: set[asyncio.Task[None]] = set()  # calls let run to their end (``let_end``)

    async def _take(self, deadline: float | None = None) -> FrameConnection:
        """An idle connection, else a new one, connected by ``deadline`` (the loop's clock)."""
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection
        loop = asyncio.get_running_loop()
        scope = asyncio.timeout_at(deadline)  # a wedged listener's SYN retries take minutes
        try:
            async with scope:
                _, connection = await loop.create_connection(
                    FrameConnection, self._host, self._port
                )
        except OSError as exc:  # TimeoutError too
            if scope.expired():
                raise _failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            raise _failed(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to connect to the orchestrator at {self._host}:{self._port}: {exc}",
            ) from None
        return connection

    def _give_back(self, connection: FrameConnection) -> None:
        connection.on_frame = None
        connection.on_lost = None
        if self._closed or connection.closed or len(self._idle) >= self._keep:
            connection.close()
        else:
            self._idle.append(connection)

    async def unary_stream(
        self,
        method: str,
        request: bytes,
        timeout_s: float | None = None,
        metadata: MetadataPairs = (),
    ) -> AsyncGenerator[bytes, None]:
        """The call's response messages; raises ``grpc.aio.AioRpcError`` for a status other
        than OK. Closing the iterator before the end cancels the call. A caller that reads
        slowly stops the reading from the socket (``_READ_HIGH``), so the orchestrator's writes
        wait for it as they would over gRPC, instead of its messages piling up here."""
        try:
            raw_method, raw_metadata = method.encode(), encode_metadata(metadata)
        except (UnicodeError, struct.error) as exc:  # e.g. a lone surrogate, a 64 KiB key
            raise _failed(
                grpc.StatusCode.INTERNAL, f"frames: the call cannot be encoded: {exc}"
            ) from None
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + max(timeout_s, 0.0)
        connection = await self._take(deadline)
        transport: asyncio.Transport = connection.transport  # type: ignore[assignment]
        frames: deque[tuple[int, bytes]] = deque()
        waiter: list[asyncio.Future[None] | None] = [None]
        paused = [False]

        def wake() -> None:
            future = waiter[0]
            if future is not None and not future.done():
                future.set_result(None)

        def arrived(kind: int, payload: bytes) -> None:
            frames.append((kind, payload))
            if len(frames) >= _READ_HIGH and not paused[0]:
                paused[0] = True
                transport.pause_reading()
            wake()

        connection.on_frame = arrived
        connection.on_lost = wake
        expired = [False]

        def expire() -> None:
            expired[0] = True
            wake()

        timer = None if deadline is None else loop.call_at(deadline, expire)
        left = None if deadline is None else deadline - loop.time()
        connection.send(CALL, _call(raw_method, left, raw_metadata, request))
        ended = False
        try:
            while True:
                while frames:
                    kind, payload = frames.popleft()
                    if paused[0] and len(frames) <= _READ_LOW:
                        paused[0] = False
                        transport.resume_reading()
                    if kind == MESSAGE:
                        yield payload
                    elif kind == END:
                        code, details, trailing = decode_end(payload)
                        # At its deadline the server closes the connection after its END: one
                        # read before the end of file, so not ``closed`` yet, and not reusable.
                        ended = code is not grpc.StatusCode.DEADLINE_EXCEEDED
                        if code is not grpc.StatusCode.OK:
                            raise _failed(code, details, trailing)
                        return
                    elif kind != HEADERS:
                        raise ProtocolError(f"frame kind {kind} in a call's answer")
                if expired[0]:
                    raise _failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                if connection.closed:
                    raise _failed(
                        grpc.StatusCode.UNAVAILABLE, "the orchestrator closed the connection"
                    )
                future = waiter[0] = loop.create_future()
                try:
                    await future
                finally:
                    waiter[0] = None
        except ProtocolError as exc:
            raise _failed(grpc.StatusCode.INTERNAL, f"frames: {exc}") from None
        finally:
            if timer is not None:
                timer.cancel()
            if ended:
                if paused[0]:
                    transport.resume_reading()
                self._give_back(connection)
            else:  # cancelled, failed or timed out mid-call: a closed connection cancels it
                connection.on_frame = connection.on_lost = None
                connection.close()

    def let_end(self, messages: AsyncGenerator[bytes, None]) -> None:
        """Let a call whose last message the caller has read (``unary_stream``'s ``messages``)
        end by itself, in a task, instead of closing it: its end comes a moment after that
        message, and only a call that ended leaves its connection for the next one. (Closed at
        once, a call closed its connection, which cancels the call; the next call then paid for
        a new connection on both sides: two calls in three at one stream through the edge.)
        A call whose end takes over ``_END_S`` is closed then."""
        task = asyncio.get_running_loop().create_task(_run_to_end(messages))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._ending):
            task.cancel()
        while self._idle:
            self._idle.pop().close()


# How long a call that ``FramesClient.let_end`` lets end may take to end.
_END_S = 1.0
# A call's frames waiting for its caller: reading from the socket pauses at the first count and
# resumes at the second (a read already in hand is delivered whole: at most one read more).
_READ_HIGH = 64
_READ_LOW = 16


async def _run_to_end(messages: AsyncGenerator[bytes, None]) -> None:
    try:
        async with asyncio.timeout(_END_S):
            async for _ in messages:  # nothing is expected after the caller's last message
                pass
    except (TimeoutError, grpc.aio.AioRpcError):
        pass  # the caller has its answer: only the connection is lost
    finally:
        await messages.aclose()
