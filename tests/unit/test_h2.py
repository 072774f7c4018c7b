"""tokenrelay's HTTP/2 client of Triton streams (``orchestrator/_h2.py``) against a real gRPC
server (``grpc.aio``, the same C core as tritonserver's): messages, status, flow control both
ways, cancellation, a server's stream limit, a server that goes away, and one that is not there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import hpack
import pytest

from tokenrelay.orchestrator._h2 import (
    _DATA,
    _HEADER,
    _RST_STREAM,
    _SETTING,
    _SETTINGS,
    _WINDOW,
    _WINDOW_UPDATE,
    H2Channel,
    _Connection,
    _frame,
    _plain_block,
    _request_block,
)

_PATH = "/test.Streams/Stream"


class _Server:
    """One server-streaming method: the request (bytes) says what to answer."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.finished = 0
        self.requests: list[bytes] = []
        self.metadata: list[dict[str, str]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            kind, _, arg = request.partition(b":")
            if kind == b"count":  # arg messages, each its index
                for i in range(int(arg)):
                    yield b"m%d" % i
            elif kind == b"big":  # arg messages of 100,000 bytes
                for i in range(int(arg)):
                    yield bytes([i % 256]) * 100_000
            elif kind == b"one":  # one message of arg bytes
                yield b"z" * int(arg)
            elif kind == b"fail":
                yield b"before"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing: 100% ✗")
            elif kind == b"longfail":  # a status whose message is arg bytes long
                await context.abort(grpc.StatusCode.INTERNAL, "e" * int(arg))
            elif kind == b"hold":  # one message, then wait to be released or cancelled
                yield b"first"
                await self.release.wait()
                yield b"released"
            elif kind == b"size":  # the request's size
                yield str(len(request)).encode()
            self.finished += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_stream_rpc_method_handler(self.stream)
        return grpc.method_handlers_generic_handler("test.Streams", {"Stream": method})


@pytest.fixture
async def server() -> AsyncIterator[tuple[_Server, str, grpc.aio.Server]]:
    state = _Server()
    grpc_server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 4)])
    grpc_server.add_generic_rpc_handlers((state.handler(),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    yield state, f"127.0.0.1:{port}", grpc_server
    await grpc_server.stop(0)


async def _all(channel: H2Channel, request: bytes) -> list[bytes]:
    messages = []
    async with asyncio.timeout(20):  # a window never reopened would hang here
        stream = await channel.stream(_PATH, request, (("x-trace", "t1"),))
        while (message := await stream.read()) is not None:
            messages.append(message)
    return messages


async def _eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - the server's counters come from its own tasks
            await asyncio.sleep(0.01)


async def test_messages_then_the_end_and_the_metadata_reaches_the_server(server: Any) -> None:
    state, address, _ = server
    channel = H2Channel(address, 2.0)
    assert await _all(channel, b"count:5") == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert await _all(channel, b"count:0") == []
    assert state.metadata[0]["x-trace"] == "t1"
    # TCP keepalive: a node that vanishes fails its streams within a minute or so.
    sock = channel._connections[0]._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
    await channel.close()


async def test_a_failure_comes_after_the_messages_before_it_with_code_and_details(
    server: Any,
) -> None:
    _, address, _ = server
    channel = H2Channel(address, 2.0)
    stream = await channel.stream(_PATH, b"fail")
    assert await stream.read() == b"before"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "bad thing: 100% ✗"
    await channel.close()


async def test_a_status_with_a_long_message_fails_only_its_own_stream(server: Any) -> None:
    state, address, _ = server
    channel = H2Channel(address, 2.0)
    held = await channel.stream(_PATH, b"hold")
    assert await held.read() == b"first"
    stream = await channel.stream(_PATH, b"longfail:100000")  # trailers past 64 KiB
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert caught.value.details() == "e" * 100_000
    state.release.set()  # the other stream on the connection goes on
    assert await held.read() == b"released"
    assert await held.read() is None
    assert await _all(channel, b"count:1") == [b"m0"]
    assert len(channel._connections) == 1
    await channel.close()


async def test_large_requests_and_answers_pass_the_flow_control_windows(server: Any) -> None:
    state, address, _ = server
    channel = H2Channel(address, 2.0)
    request = b"size:" + b"x" * 3_000_000  # past the server's 64 KiB windows
    assert await _all(channel, request) == [str(len(request)).encode()]
    # 40 messages of 100,000 bytes: frames of 16 KiB, 4 MB past our 1 MiB stream window.
    answers = await asyncio.gather(*(_all(channel, b"big:40") for _ in range(3)))
    for messages in answers:
        assert [len(m) for m in messages] == [100_000] * 40
        assert [m[0] for m in messages] == list(range(40))
    assert state.finished == 4
    await channel.close()


async def test_cancel_ends_the_servers_call_and_leaves_the_connection_to_others(
    server: Any,
) -> None:
    state, address, _ = server
    channel = H2Channel(address, 2.0)
    stream = await channel.stream(_PATH, b"hold")
    assert await stream.read() == b"first"
    stream.cancel()
    await _eventually(lambda: state.cancelled == 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() is grpc.StatusCode.CANCELLED
    assert await _all(channel, b"count:2") == [b"m0", b"m1"]
    assert len(channel._connections) == 1
    await channel.close()


async def test_a_stream_let_end_is_not_cancelled(server: Any) -> None:
    state, address, _ = server
    channel = H2Channel(address, 2.0)
    stream = await channel.stream(_PATH, b"count:1")
    assert await stream.read() == b"m0"
    stream.let_end(1.0)  # the last message read: the status follows
    await _eventually(lambda: stream.done)
    assert (state.finished, state.cancelled) == (1, 0)
    await channel.close()


async def test_streams_past_the_servers_limit_open_another_connection(server: Any) -> None:
    state, address, _ = server
    channel = H2Channel(address, 2.0)
    first = await _all(channel, b"count:1")  # the server's settings (4 streams) are known now
    assert first == [b"m0"]
    streams = [await channel.stream(_PATH, b"hold") for _ in range(6)]
    for stream in streams:
        assert await stream.read() == b"first"
    assert state.running == 6
    assert len(channel._connections) == 2
    state.release.set()
    for stream in streams:
        assert await stream.read() == b"released"
        assert await stream.read() is None
    await channel.close()


async def test_a_server_that_stops_fails_its_streams_as_unavailable(server: Any) -> None:
    _, address, grpc_server = server
    channel = H2Channel(address, 2.0)
    stream = await channel.stream(_PATH, b"hold")
    assert await stream.read() == b"first"
    await grpc_server.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(5):
            await stream.read()
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.stream(_PATH, b"count:1")
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    await channel.close()


async def test_no_server_is_unavailable_and_a_wrong_path_unimplemented(server: Any) -> None:
    _, address, _ = server
    channel = H2Channel("127.0.0.1:1", 2.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream(_PATH, b"count:1")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    await channel.close()
    channel = H2Channel(address, 2.0)
    stream = await channel.stream("/test.Streams/Nothing", b"")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stream.read()
    assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED
    await channel.close()


async def test_a_message_larger_than_the_stream_window_comes_whole(server: Any) -> None:
    _, address, _ = server
    channel = H2Channel(address, 2.0)
    assert await _all(channel, b"one:3000000") == [b"z" * 3_000_000]  # the window: 1 MiB
    assert await _all(channel, b"big:3") == [bytes([i]) * 100_000 for i in range(3)]
    await channel.close()


async def test_a_request_the_server_refuses_while_it_is_sent_ends_with_its_status(
    server: Any,
) -> None:
    _, address, _ = server
    channel = H2Channel(address, 2.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # Past the server's 4 MiB limit: it answers before the whole request is in.
        await _all(channel, b"size:" + b"x" * 20_000_000)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _all(channel, b"count:1") == [b"m0"]
    await channel.close()


def test_addresses_it_takes() -> None:
    assert H2Channel.parses("127.0.0.1:8001")
    assert H2Channel.parses("[::1]:8001")
    assert H2Channel.parses("triton-0.triton:8001")
    assert not H2Channel.parses("dns:///triton-headless:8001")
    assert not H2Channel.parses("unix:/tmp/triton.sock")
    assert not H2Channel.parses("127.0.0.1")


def test_request_headers_are_coded_as_hpack_decodes_them() -> None:
    metadata = [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    long = [("x-long", "v" * 300)]  # a length past the 7-bit prefix
    decoder = hpack.Decoder()
    for first, scheme, extra in ((True, "http", metadata), (False, "https", long)):
        block = _request_block(scheme, _PATH, "node:8001", extra, first)
        assert decoder.decode(block) == [
            (":method", "POST"),
            (":scheme", scheme),
            (":path", _PATH),
            (":authority", "node:8001"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", "tokenrelay"),
            *extra,
        ]
    assert decoder.header_table.maxsize == 0  # the first block set our table's size to 0


def test_blocks_that_leave_the_table_alone_are_read_without_the_decoder() -> None:
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    first = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    assert _plain_block(first, decoder.header_table) is None  # it adds to the table
    assert decoder.decode(first) == [(":status", "200"), ("content-type", "application/grpc")]
    again = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    assert _plain_block(again, decoder.header_table) == decoder.decode(again)
    trailers = b"\x00\x0bgrpc-status\x010\x00\x0cgrpc-message\x00"  # literals, no indexing
    assert _plain_block(trailers, decoder.header_table) == [
        ("grpc-status", "0"),
        ("grpc-message", ""),
    ]
    huffman = encoder.encode([("grpc-message", "a" * 40)], huffman=True)
    assert _plain_block(huffman, decoder.header_table) is None


class _Transport:
    """What a connection writes, for the frame-level test below."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, key: str) -> None:
        return None

    def kinds(self) -> list[int]:
        """The kinds of the frames written so far, in order."""
        data, position, kinds = b"".join(self.out), 0, []
        while position + 9 <= len(data):
            high, low, kind, _, _ = _HEADER.unpack_from(data, position)
            kinds.append(kind)
            position += 9 + ((high << 8) | low)
        return kinds


async def test_a_request_cancelled_while_it_waits_for_window_sends_nothing_more() -> None:
    """RFC 9113 §5.1: after our RST_STREAM, no DATA on that stream, whatever window opens."""
    connection = _Connection(asyncio.get_running_loop(), "triton:8001", "http")
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    transport.out.clear()  # the preface
    # The server's streams may take 1 MiB, its connection 64 KiB: the request waits for the latter.
    connection.data_received(_frame(_SETTINGS, 0, 0, _SETTING.pack(4, 1 << 20)))
    stream, headers = connection.open(_PATH, ())
    sending = asyncio.create_task(connection.send(stream, b"x" * 300_000, headers))
    await asyncio.sleep(0)
    assert transport.kinds().count(_DATA) > 0 and not sending.done()
    transport.out.clear()
    stream.cancel()
    connection.data_received(_frame(_WINDOW_UPDATE, 0, 0, _WINDOW.pack(1 << 20)))
    await asyncio.wait_for(sending, 5)
    assert _DATA not in transport.kinds()
    assert _RST_STREAM in transport.kinds()
