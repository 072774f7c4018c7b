"""Server-streaming gRPC calls to Triton over a small HTTP/2 client of our own.

Why not ``grpc.aio`` for these: a message read and decoded through it cost ~55 µs of the
orchestrator's CPU against ~20 here (``benchmarks/h2_read.py``, both clients against one server):
a completion-queue batch per message, the poller thread's wake-up, the Cython call and future
around it, about half of everything the orchestrator spent per relayed token. Here one
``data_received`` call parses every frame the kernel handed over — at 64 streams often many
streams' messages at once — and a message costs a few slices and a future's result.

What is spoken: HTTP/2 (RFC 9113) with prior knowledge (``h2c``) or TLS with ALPN ``h2``, one
connection per node (another one is opened when the server's ``MAX_CONCURRENT_STREAMS`` is
reached), gRPC's length-prefixed messages without compression, and status from the trailers
(``grpc-status``, ``grpc-message``) or from the HTTP status of a response that is not gRPC.
Header blocks: ours coded here without a dynamic table (``_request_block``), the server's read
without ``hpack``'s decoder when they leave its table alone (``_plain_block``: after a
connection's first answer, gRPC's headers and trailers do), else by it. Flow control both ways:
what the server sends is given back per connection as it arrives and per stream as the reader
takes whole messages (a lagging reader holds at most about half of ``_STREAM_WINDOW`` in them),
and a large request waits for the server's windows. Pings are answered, ``GOAWAY`` stops new
streams on the connection and fails those the server will not answer, ``RST_STREAM`` and a lost
connection fail their streams; TCP keepalive finds a node that vanished. A read of ``_BURST`` or
more lets the loop run before the next.

Failures are raised as ``grpc.aio.AioRpcError`` with the status gRPC would report, so callers
translate them exactly as they translate ``grpc.aio``'s. Only ``ModelStreamInfer`` goes this
way; unary calls (readiness, embeddings) stay on ``grpc.aio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import typing
from collections import deque
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

import grpc
import hpack

__all__ = ["H2Channel", "H2Stream", "tls_context"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER = struct.Struct(">HBBBL")  # a frame header: 24-bit length as 16 + 8, type, flags, id
_MESSAGE = struct.Struct(">BL")  # a gRPC message's prefix: compressed flag, length
_SETTING = struct.Struct(">HL")
_WINDOW = struct.Struct(">L")

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0,
    1,
    3,
    4,
    6,
    7,
    8,
    9,
)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_SETTINGS_MAX_CONCURRENT_STREAMS = 3
_SETTINGS_INITIAL_WINDOW_SIZE, _SETTINGS_MAX_FRAME_SIZE = 4, 5
_CANCEL = 0x8

# What we let the server send ahead: per stream (acknowledged as the reader takes messages) and
# per connection (acknowledged as frames arrive; the streams' windows bound what is buffered).
_STREAM_WINDOW = 1 << 20
_CREDIT = _STREAM_WINDOW // 4  # the least a stream's WINDOW_UPDATE gives back (but see _credit)
_CONNECTION_WINDOW = 1 << 24
_DEFAULT_WINDOW = 65_535
_BURST = 32_768  # a read this large lets the loop run before the next (data_received)
_MAX_FRAME = 16_384  # the largest frame we accept (we announce no other SETTINGS_MAX_FRAME_SIZE)
_MAX_BLOCK = 1 << 20  # the largest header block (HEADERS and its CONTINUATIONs) we gather

# HTTP statuses of a response that is not gRPC, as gRPC maps them.
_HTTP_CODES = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_RESET_CODES = {
    0x7: grpc.StatusCode.UNAVAILABLE,  # REFUSED_STREAM: never processed, safe to retry
    0x8: grpc.StatusCode.CANCELLED,
    0xB: grpc.StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


def _string(text: str) -> bytes:
    """An HPACK string literal, not Huffman-coded."""
    data = text.encode()
    return _integer(len(data), 7, 0) + data


def _integer(value: int, bits: int, first: int) -> bytes:
    """An HPACK integer with a ``bits``-bit prefix, OR-ed into ``first``."""
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _request_block(
    scheme: str, path: str, authority: str, metadata: Sequence[tuple[str, str]], first: bool
) -> bytes:
    """A request's header block, coded without our dynamic table (it is set to size 0 in the
    connection's first block, so no server setting can ever make it too large): static-table
    names and literal values, never Huffman. Costs ~2 µs against ``hpack.Encoder``'s ~14."""
    parts = [
        b"\x20" if first else b"",  # dynamic table size update: 0
        b"\x83",  # :method POST (static 3)
        b"\x87" if scheme == "https" else b"\x86",  # :scheme (static 7 / 6)
        b"\x04" + _string(path),  # :path, literal without indexing, name static 4
        b"\x01" + _string(authority),  # :authority (static 1)
        b"\x00\x02te\x08trailers",
        b"\x0f\x10\x10application/grpc",  # content-type (static 31)
        b"\x0f\x2b\x0atokenrelay",  # user-agent (static 58)
    ]
    for name, value in metadata:
        parts.append(b"\x00" + _string(name.lower()) + _string(value))
    return b"".join(parts)


def _plain_block(block: bytes, table: typing.Any) -> list[tuple[str, str]] | None:
    """A header block decoded without the decoder when every field in it leaves the dynamic
    table as it is — indexed ones (one byte) and literals without indexing, new name, not
    Huffman-coded, as gRPC's server sends the responses' headers and trailers after a
    connection's first ones; ``None`` for any other block (the decoder's then)."""
    fields = []
    position, size = 0, len(block)
    while position < size:
        first = block[position]
        if 0x80 < first < 0xFF:  # indexed, index 1 to 126
            name, value = table.get_by_index(first & 0x7F)
            fields.append((name.decode(), value.decode()))
            position += 1
        elif first in (0x00, 0x10):  # literal without / never indexed, new name
            strings = []
            position += 1
            for _ in range(2):
                if position >= size:
                    return None
                length = block[position]
                if length >= 0x7F:  # Huffman-coded, or a longer length: the decoder's
                    return None
                strings.append(block[position + 1 : position + 1 + length].decode())
                position += 1 + length
            if position > size:
                return None
            fields.append((strings[0], strings[1]))
        else:
            return None
    return fields


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


class H2Stream:
    """One call: the request went out whole (or is going out); ``read`` gives the response's
    messages, then ``None`` once the server ended the call with status OK."""

    __slots__ = (
        "_connection",
        "_end_timer",
        "_ended",
        "_error",
        "_headers",
        "_messages",
        "_owed",
        "_partial",
        "_queued",
        "_waiter",
        "id",
        "send_window",
    )

    def __init__(self, connection: _Connection, stream_id: int, send_window: int) -> None:
        self._connection = connection
        self.id = stream_id
        self._messages: deque[bytes] = deque()
        self._partial = bytearray()  # the start of a message that spans frames
        self._waiter: asyncio.Future[None] | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._ended = False  # the server's trailers came (status OK), or the stream failed
        self._headers = False  # the response's headers came
        self._owed = 0  # bytes received and not yet given back to the stream's window
        self._queued = 0  # bytes of the messages waiting in _messages
        self.send_window = send_window
        self._end_timer: asyncio.TimerHandle | None = None

    # -- the reader's side

    async def read(self) -> bytes | None:
        """The next message; ``None`` when the call ended with status OK; raises the call's
        failure as ``grpc.aio.AioRpcError`` (after the messages that came before it)."""
        messages = self._messages
        while not messages:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            waiter = self._waiter = self._connection.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        message = messages.popleft()
        self._queued -= len(message)
        if self._owed >= _CREDIT:
            self._credit()
        return message

    @property
    def done(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        """Ends the call now (``RST_STREAM`` CANCEL): the server cancels its request."""
        if not self._ended:
            self._fail(_error(grpc.StatusCode.CANCELLED, "Cancelled by the client."))
            self._connection.reset(self.id)

    def let_end(self, timeout_s: float) -> None:
        """The last response has been read: let the server's trailers end the call, cancelling
        it only if they take over ``timeout_s`` (a reset that overtakes them makes Triton count
        the cancellation of a request it has answered)."""
        if not self._ended and self._end_timer is None:
            self._end_timer = self._connection.loop.call_later(timeout_s, self.cancel)

    # -- the connection's side

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _credit(self) -> None:
        """Gives the stream's window back what came, unless a reader that lags holds over
        half of it in whole messages (then ``read`` gives it back as it takes them). Bytes of
        a message not yet whole are always given back, so a message larger than the window
        still comes."""
        if self._queued < _STREAM_WINDOW // 2 and not self._ended:
            self._connection.window_update(self.id, self._owed)
            self._owed = 0

    def _message(self, message: bytes) -> None:
        """One whole message (the usual DATA frame holds exactly one)."""
        self._messages.append(message)
        self._queued += len(message)
        self._owed += len(message) + 5
        if self._owed >= _CREDIT:
            self._credit()
        self._wake()

    def _data(self, payload: bytes) -> None:
        """Any other DATA: part of a message, or several."""
        self._owed += len(payload)
        buffer = self._partial
        buffer += payload
        size = len(buffer)
        position = 0
        while size - position >= 5:
            compressed, length = _MESSAGE.unpack_from(buffer, position)
            if size - position - 5 < length:
                break
            if compressed:
                self._fail(_error(grpc.StatusCode.INTERNAL, "A compressed message came unasked."))
                self._connection.reset(self.id)
                return
            self._messages.append(bytes(buffer[position + 5 : position + 5 + length]))
            self._queued += length
            position += 5 + length
        del buffer[:position]
        if self._owed >= _CREDIT or (buffer and self._owed):
            self._credit()
        self._wake()

    def _header_block(self, headers: Iterable[tuple[str, str]], end_stream: bool) -> None:
        fields = dict(headers)
        if not self._headers:
            self._headers = True
            status = fields.get(":status", "")
            if status != "200":
                code = _HTTP_CODES.get(int(status) if status.isdigit() else 0)
                self._fail(
                    _error(code or grpc.StatusCode.UNKNOWN, f"HTTP status {status or 'none'}.")
                )
                if not end_stream:
                    self._connection.reset(self.id)
                return
            if not end_stream:
                return
        # Trailers (or a trailers-only response): the call's status.
        value = fields.get("grpc-status")
        if value is None:
            self._fail(_error(grpc.StatusCode.INTERNAL, "The call ended without a gRPC status."))
            return
        code = _CODES.get(int(value) if value.isdigit() else -1, grpc.StatusCode.UNKNOWN)
        if code is grpc.StatusCode.OK:
            if self._partial:
                self._fail(_error(grpc.StatusCode.INTERNAL, "The call ended inside a message."))
                return
            self._finish()
        else:
            self._fail(_error(code, unquote(fields.get("grpc-message", ""))))

    def _finish(self) -> None:
        self._ended = True
        if self._end_timer is not None:
            self._end_timer.cancel()
        self._connection.forget(self.id)
        self._wake()
        self._connection.wake_senders()  # a request still waiting for window: it ends too

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if self._ended:
            return
        self._error = error
        self._finish()


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: frames in (``data_received``) and out (``transport.write``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, authority: str, scheme: str) -> None:
        self.loop = loop
        self._authority = authority
        self._scheme = scheme
        self._transport: asyncio.Transport | None = None
        self._pending = b""
        self._streams: dict[int, H2Stream] = {}
        self._next_id = 1
        self._first_block = True  # ours: it starts by setting our table's size to 0
        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = 1 << 16
        # hpack's 64 KiB default would abort the connection, every stream on it, for one long
        # grpc-message (a Python backend's traceback); a block is bounded as gathered instead.
        self._decoder.max_header_list_size = 1 << 24
        self._continuing: H2Stream | None = None  # the stream whose header block is open
        self._continuing_end = False
        self._open_block = b""
        self._peer_window = _DEFAULT_WINDOW  # the server's initial window for our streams
        self._max_frame = 16_384
        self._max_streams = 1 << 31
        self._send_window = _DEFAULT_WINDOW  # the server's connection window
        self._window_opened = asyncio.Event()
        self._received = 0  # connection-level bytes not yet acknowledged
        self.closed = False
        self._going_away = False
        self._lost: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclass of asyncio.Transport, but have its methods.
        self._transport = typing.cast(asyncio.Transport, transport)
        _keepalive(transport.get_extra_info("socket"))
        settings = _SETTING.pack(0x2, 0) + _SETTING.pack(  # ENABLE_PUSH off
            _SETTINGS_INITIAL_WINDOW_SIZE, _STREAM_WINDOW
        )
        self._transport.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, _WINDOW.pack(_CONNECTION_WINDOW - _DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._window_opened.set()
        for stream in list(self._streams.values()):
            stream._fail(_error(grpc.StatusCode.UNAVAILABLE, "The connection to Triton was lost."))
        self._streams.clear()
        if not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._pending:
            data = self._pending + data
        size = len(data)
        position = 0
        received = 0
        streams = self._streams
        while size - position >= 9:
            high, low, kind, flags, stream_id = _HEADER.unpack_from(data, position)
            length = (high << 8) | low
            if length > _MAX_FRAME:  # not HTTP/2, or a server breaking it
                self._abort("Triton sent a frame larger than allowed.")
                return
            end = position + 9 + length
            if end > size:
                break
            if kind == _DATA:
                received += length
                stream = streams.get(stream_id & 0x7FFFFFFF)
                if stream is not None:
                    start = position + 9
                    if flags & _PADDED:
                        padding = data[start] if length else 256
                        if padding >= length:
                            self._abort("Triton sent a DATA frame padded past its end.")
                            return
                        stream._owed += padding + 1
                        stream._data(data[start + 1 : end - padding])
                    elif (
                        length >= 5
                        and not stream._partial
                        and data[start] == 0
                        and int.from_bytes(data[start + 1 : start + 5]) == length - 5
                    ):  # the usual frame: one whole message
                        stream._message(data[start + 5 : end])
                    elif length:
                        stream._data(data[start:end])
                    if flags & _END_STREAM and not stream.done:
                        stream._fail(
                            _error(grpc.StatusCode.INTERNAL, "The call ended without trailers.")
                        )
            else:
                self._control(kind, flags, stream_id & 0x7FFFFFFF, data[position + 9 : end])
                if self.closed:  # aborted: nothing more to read
                    return
            position = end
        self._pending = data[position:] if position < size else b""
        if size >= _BURST and self._transport is not None and not self.closed:
            # Read no more until the loop has run what this read woke: libuv reads a socket
            # up to 32 times in one go, so under load one loop pass could take thousands of
            # messages and every stream's work for them before any timer or new connection
            # (loop lag ~0.5 s at 256 streams).
            self._transport.pause_reading()
            self.loop.call_soon(self._resume)
        if received:
            self._received += received
            if self._received >= _CONNECTION_WINDOW // 2:
                self._write(_frame(_WINDOW_UPDATE, 0, 0, _WINDOW.pack(self._received)))
                self._received = 0

    def _resume(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    # -- frames other than DATA

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == _HEADERS:
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & _PRIORITY:
                payload = payload[5:]
            self._continuing = self._streams.get(stream_id)
            self._continuing_end = bool(flags & _END_STREAM)
            self._open_block = payload
            if flags & _END_HEADERS:
                self._header_block()
        elif kind == _CONTINUATION:
            self._open_block += payload
            if len(self._open_block) > _MAX_BLOCK:  # not decoded, the shared table is lost
                self._abort(f"Triton sent a header block over {_MAX_BLOCK} bytes.")
            elif flags & _END_HEADERS:
                self._header_block()
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._settings(payload)
                self._write(_frame(_SETTINGS, _ACK, 0))
        elif kind == _PING:
            if not flags & _ACK:
                self._write(_frame(_PING, _ACK, 0, payload))
        elif kind == _WINDOW_UPDATE:
            (increment,) = _WINDOW.unpack_from(payload)
            increment &= 0x7FFFFFFF
            if stream_id == 0:
                self._send_window += increment
            elif (stream := self._streams.get(stream_id)) is not None:
                stream.send_window += increment
            self._window_opened.set()
        elif kind == _RST_STREAM:
            stream = self._streams.get(stream_id)
            if stream is not None:
                (code,) = _WINDOW.unpack_from(payload)
                status = _RESET_CODES.get(code, grpc.StatusCode.INTERNAL)
                stream._fail(_error(status, f"Triton reset the stream (HTTP/2 error {code})."))
        elif kind == _GOAWAY:
            (last,) = _WINDOW.unpack_from(payload)
            last &= 0x7FFFFFFF
            self._going_away = True
            for sid, stream in list(self._streams.items()):
                if sid > last:
                    stream._fail(
                        _error(grpc.StatusCode.UNAVAILABLE, "Triton closed the connection.")
                    )
            self._close_when_idle()
        # PRIORITY, PUSH_PROMISE (refused in our settings) and unknown frames are ignored.

    def _header_block(self) -> None:
        block, stream = self._open_block, self._continuing
        self._open_block, self._continuing = b"", None
        try:
            # Every block is decoded, a dropped stream's too: they share the dynamic table.
            headers = _plain_block(block, self._decoder.header_table) or [
                (str(name), str(value)) for name, value in self._decoder.decode(block)
            ]
        except (hpack.HPACKError, UnicodeDecodeError):
            self._abort("Triton sent a header block that cannot be decoded.")
            return
        if stream is not None:
            stream._header_block(headers, self._continuing_end)

    def _settings(self, payload: bytes) -> None:
        for position in range(0, len(payload) - 5, 6):
            key, value = _SETTING.unpack_from(payload, position)
            if key == _SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                self._window_opened.set()
            elif key == _SETTINGS_MAX_FRAME_SIZE:
                self._max_frame = value
            elif key == _SETTINGS_MAX_CONCURRENT_STREAMS:
                self._max_streams = value

    # -- writing

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def wake_senders(self) -> None:
        self._window_opened.set()

    def window_update(self, stream_id: int, increment: int) -> None:
        self._write(_frame(_WINDOW_UPDATE, 0, stream_id, _WINDOW.pack(increment)))

    def reset(self, stream_id: int) -> None:
        self._write(_frame(_RST_STREAM, 0, stream_id, _WINDOW.pack(_CANCEL)))

    def forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if self._going_away:
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        if not self._streams and self._transport is not None:
            self._transport.close()

    def _abort(self, why: str) -> None:
        self.closed = True
        for stream in list(self._streams.values()):
            stream._fail(_error(grpc.StatusCode.INTERNAL, why))
        if self._transport is not None:
            self._transport.abort()

    @property
    def usable(self) -> bool:
        return (
            not self.closed
            and not self._going_away
            and len(self._streams) < self._max_streams
            and self._next_id < (1 << 31) - 2
        )

    def open(self, path: str, metadata: Sequence[tuple[str, str]]) -> tuple[H2Stream, list[bytes]]:
        """A new stream and its header frames, which ``send`` must write (with the message)
        before anything is awaited: header blocks go out in the order they were coded."""
        stream_id = self._next_id
        self._next_id += 2
        stream = H2Stream(self, stream_id, self._peer_window)
        self._streams[stream_id] = stream
        block = _request_block(self._scheme, path, self._authority, metadata, self._first_block)
        self._first_block = False
        frames = []
        first = True
        while first or block:  # a block over the frame size continues in CONTINUATION frames
            piece, block = block[: self._max_frame], block[self._max_frame :]
            flags = 0 if block else _END_HEADERS
            frames.append(_frame(_HEADERS if first else _CONTINUATION, flags, stream_id, piece))
            first = False
        return stream, frames

    async def send(self, stream: H2Stream, message: bytes, frames: list[bytes]) -> None:
        """``frames`` (the stream's headers), then the request's one message and the
        half-close, within the server's windows: one write when the windows allow."""
        data = _MESSAGE.pack(0, len(message)) + message
        while True:
            size = min(len(data), self._max_frame, self._send_window, stream.send_window)
            if size > 0 or not data:
                piece, data = data[:size], data[size:]
                self._send_window -= size
                stream.send_window -= size
                frames.append(_frame(_DATA, 0 if data else _END_STREAM, stream.id, piece))
                if not data:
                    self._write(b"".join(frames))
                    return
                continue
            self._write(b"".join(frames))
            frames = []
            if self.closed or stream.done:
                return  # the stream's reader sees why
            self._window_opened.clear()
            await self._window_opened.wait()
            if self.closed or stream.done:  # reset or ended while it waited: nothing more
                return

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._lost


class H2Channel:
    """Streams to one ``host:port`` (``[v6]:port`` too), over as few connections as the server's
    stream limit allows; a connection is opened when none can take the stream (the first call,
    or after one was lost)."""

    def __init__(self, address: str, connect_s: float, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not a host:port address: {address!r}")
        self._host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._port = int(port)
        self._authority = address
        self._connect_s = connect_s
        self._tls = tls
        self._connections: list[_Connection] = []
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    @staticmethod
    def parses(address: str) -> bool:
        """Whether ``address`` is a plain ``host:port`` this channel connects to (not a gRPC
        target with a scheme, such as ``dns:///`` or ``unix:``)."""
        host, _, port = address.rpartition(":")
        return bool(host) and port.isdigit() and "/" not in host and not host.startswith("unix")

    async def _connection(self) -> _Connection:
        for connection in self._connections:
            if connection.usable:
                return connection
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            self._connections = [c for c in self._connections if not c.closed]
            for connection in self._connections:
                if connection.usable:
                    return connection
            if self._closed:
                raise _error(grpc.StatusCode.UNAVAILABLE, "The channel is closed.")
            loop = asyncio.get_running_loop()
            scheme = "https" if self._tls is not None else "http"
            try:
                async with asyncio.timeout(self._connect_s):
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(loop, self._authority, scheme),
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                raise _error(
                    grpc.StatusCode.UNAVAILABLE, f"Cannot connect to {self._authority}: {exc}"
                ) from exc
            transport = protocol._transport
            alpn = transport.get_extra_info("ssl_object") if transport is not None else None
            if self._tls is not None and (alpn is None or alpn.selected_alpn_protocol() != "h2"):
                protocol.close()
                raise _error(
                    grpc.StatusCode.UNAVAILABLE, f"{self._authority} does not speak HTTP/2 (ALPN)."
                )
            if self._closed:  # closed while connecting
                protocol.close()
                raise _error(grpc.StatusCode.UNAVAILABLE, "The channel is closed.")
            if not protocol.usable:  # lost or told to go away before this task resumed
                protocol.close()
                raise _error(
                    grpc.StatusCode.UNAVAILABLE, f"{self._authority} closed the connection."
                )
            self._connections.append(protocol)
            return protocol

    async def stream(
        self, path: str, message: bytes, metadata: Sequence[tuple[str, str]] = ()
    ) -> H2Stream:
        """Starts a call of ``path`` with one request ``message`` and the half-close."""
        connection = await self._connection()
        stream, headers = connection.open(path, metadata)
        try:
            await connection.send(stream, message, headers)
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def close(self) -> None:
        self._closed = True
        connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        for connection in connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.wait_closed(), 1.0)


def _keepalive(sock: typing.Any) -> None:
    """TCP keepalive, so that a connection to a node that vanished (power, partition) fails its
    streams within about a minute instead of the kernel's ~15: probes after 30 s idle, every
    10 s, 3 missed; sent data unacknowledged for 60 s also ends it. (Not HTTP/2 pings: Triton
    answers those more often than every 5 minutes with GOAWAY.)"""
    if sock is None:
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 30),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 10),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), 60_000),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def tls_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client TLS context for Triton's gRPC endpoint: the CA file of its certificate, our
    certificate and key files for mutual TLS when given, ALPN ``h2``."""
    context = ssl.create_default_context(cafile=ca)
    if cert and key:
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context
