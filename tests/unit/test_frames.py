"""tokenrelay._frames: the frames hop's codec, its server and client over real loopback sockets,
with handlers of this module standing in for the orchestrator's."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from tokenrelay import _frames as frames
from tokenrelay._frames import (
    CALL,
    MAX_FRAME,
    FramesClient,
    FramesServer,
    ProtocolError,
    decode_call,
    decode_end,
    decode_metadata,
    encode_call,
    encode_end,
    encode_metadata,
)

METHOD = "/test.Service/Stream"


def test_metadata_call_and_end_round_trip() -> None:
    pairs = (("authorization", "Bearer s3cret"), ("x-id", "é"), ("details-bin", b"\x00\xff"))
    assert decode_metadata(encode_metadata(pairs)) == (pairs, len(encode_metadata(pairs)))
    assert decode_call(encode_call(METHOD, 2.5, pairs, b"req")) == (METHOD, 2.5, pairs, b"req")
    assert decode_call(encode_call(METHOD, None, (), b""))[1] is None
    end = encode_end(grpc.StatusCode.NOT_FOUND, "no such model", pairs)
    assert decode_end(end) == (grpc.StatusCode.NOT_FOUND, "no such model", pairs)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x05\x00ab",
        encode_metadata((("k", "v"),))[:-1],
        b"\x01\x00\x01\x00\xff\x00\x00\x00\x00",
    ],
)
def test_malformed_metadata_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_metadata(payload)


def test_an_unknown_status_code_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_end(b"\xc8\x00\x00\x00\x00\x00\x00")


class Served:
    """A handler for the server, and what it saw."""

    def __init__(self) -> None:
        self.contexts: list[Any] = []
        self.requests: list[bytes] = []
        self.cancelled = 0
        self.started = asyncio.Event()
        self.behave: Callable[[bytes, Any], Any] = self.echo

    async def __call__(self, request: bytes, context: Any) -> None:
        self.requests.append(request)
        self.contexts.append(context)
        self.started.set()
        try:
            await self.behave(request, context)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def cancelled_once(self) -> None:
        """Wait (up to 1 s) for the handler's cancellation; exactly one."""
        for _ in range(100):
            if self.cancelled:
                break
            await asyncio.sleep(0.01)
        assert self.cancelled == 1

    @staticmethod
    async def sleeps(request: bytes, context: Any) -> None:
        await context.write(b"first")
        await asyncio.sleep(30)

    @staticmethod
    async def echo(request: bytes, context: Any) -> None:
        count = int(request or b"2")
        for i in range(count):
            await context.write(b"m%d" % i)
        context.set_trailing_metadata((("x-done", "yes"),))


@pytest.fixture
async def served() -> Served:
    return Served()


@pytest.fixture
async def server(served: Served) -> AsyncIterator[FramesServer]:
    server = FramesServer({METHOD: (served, bytes)}, max_calls=4)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop(0)


@pytest.fixture
async def client(server: FramesServer) -> AsyncIterator[FramesClient]:
    client = FramesClient("127.0.0.1", server.port)
    yield client
    await client.close()


async def _all(client: FramesClient, request: bytes, **kwargs: Any) -> list[bytes]:
    return [m async for m in client.unary_stream(METHOD, request, **kwargs)]


async def test_a_call_streams_its_messages_and_the_connection_serves_the_next(
    server: FramesServer, client: FramesClient, served: Served
) -> None:
    metadata = (("authorization", "Bearer t"), ("x-caller-bin", b"\x01\x02"))
    assert await _all(client, b"3", metadata=metadata, timeout_s=30) == [b"m0", b"m1", b"m2"]
    assert await _all(client, b"1") == [b"m0"]
    first, second = served.contexts
    assert first.invocation_metadata() == metadata
    assert 29 < first.time_remaining() <= 30
    assert second.time_remaining() is None
    assert len(server._connections) == 1  # one connection, two calls


async def test_a_call_let_end_after_its_last_message_leaves_its_connection_for_the_next(
    server: FramesServer, client: FramesClient, served: Served
) -> None:
    for _ in range(3):  # the caller has its answer (one message) and stops reading there
        messages = client.unary_stream(METHOD, b"1")
        assert await anext(messages) == b"m0"
        client.let_end(messages)
        for _ in range(100):
            if client._idle:
                break
            await asyncio.sleep(0.01)
    assert len(server._connections) == 1  # three calls, one connection
    assert served.cancelled == 0  # each ended as it would have, read to its end


async def test_a_call_let_end_that_does_not_end_is_closed_and_cancelled(
    client: FramesClient, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frames, "_END_S", 0.05)
    served.behave = Served.sleeps
    messages = client.unary_stream(METHOD, b"")
    assert await anext(messages) == b"first"
    client.let_end(messages)
    await served.cancelled_once()
    assert not client._idle


async def test_many_messages_and_large_ones_arrive_whole(
    client: FramesClient, served: Served
) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: many reads, flow control on the way

    async def large(request: bytes, context: Any) -> None:
        for _ in range(8):
            await context.write(big)
        for i in range(2000):
            await context.write(b"%d" % i)

    served.behave = large
    got = await _all(client, b"")
    assert got[:8] == [big] * 8
    assert got[8:] == [b"%d" % i for i in range(2000)]


async def test_an_abort_reaches_the_client_as_its_status_details_and_trailers(
    client: FramesClient, served: Served
) -> None:
    async def refuse(request: bytes, context: Any) -> None:
        await context.write(b"partial")
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "at capacity",
            (("grpc-status-details-bin", b"\x08\x08"),),
        )

    served.behave = refuse
    got: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in client.unary_stream(METHOD, b""):
            got.append(message)
    assert got == [b"partial"]
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "at capacity"
    assert tuple(caught.value.trailing_metadata()) == (("grpc-status-details-bin", b"\x08\x08"),)
    served.behave = Served.echo  # the connection went back to the pool and still serves
    assert await _all(client, b"1") == [b"m0"]


async def test_a_handler_that_raises_is_unknown_to_the_client_without_its_text(
    client: FramesClient, served: Served
) -> None:
    async def crash(request: bytes, context: Any) -> None:
        raise RuntimeError("secret at 10.0.0.1")

    served.behave = crash
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _all(client, b"")
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    assert "10.0.0.1" not in (caught.value.details() or "")


async def test_a_client_that_stops_reading_cancels_the_handler(
    client: FramesClient, served: Served
) -> None:
    messages = client.unary_stream(METHOD, b"1000000")
    assert await anext(messages) == b"m0"
    await messages.aclose()
    await served.cancelled_once()
    assert served.contexts[0].done()


async def test_a_cancelled_caller_cancels_the_handler(client: FramesClient, served: Served) -> None:
    served.behave = Served.sleeps
    task = asyncio.create_task(_all(client, b""))
    await asyncio.wait_for(served.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await served.cancelled_once()


async def test_the_deadline_ends_the_call_on_both_sides(
    client: FramesClient, served: Served
) -> None:
    served.behave = Served.sleeps
    got: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in client.unary_stream(METHOD, b"", timeout_s=0.2):
            got.append(message)
    assert got == [b"first"]
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await served.cancelled_once()


async def test_an_unknown_method_is_unimplemented(
    server: FramesServer, client: FramesClient
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [m async for m in client.unary_stream("/test.Service/Other", b"")]
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_calls_past_the_limit_are_refused_and_others_go_on(
    server: FramesServer, served: Served
) -> None:
    release = asyncio.Event()

    async def held(request: bytes, context: Any) -> None:
        await context.write(b"in")
        await release.wait()

    served.behave = held
    clients = [FramesClient("127.0.0.1", server.port) for _ in range(5)]
    try:
        running = [c.unary_stream(METHOD, b"") for c in clients[:4]]
        assert [await anext(m) for m in running] == [b"in"] * 4
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _all(clients[4], b"")
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert [[m async for m in r] for r in running] == [[]] * 4
    finally:
        for c in clients:
            await c.close()


async def test_garbage_closes_only_its_own_connection(
    server: FramesServer, client: FramesClient, served: Served
) -> None:
    loop = asyncio.get_running_loop()
    for garbage in (
        struct.pack("<BI", 9, 3) + b"abc",  # a kind where a call was expected
        struct.pack("<BI", CALL, 4) + b"\xff\xff\xff\xff",  # a call that does not decode
        struct.pack("<BI", CALL, MAX_FRAME + 1),  # a frame past the cap
    ):
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.setblocking(False)
            await loop.sock_sendall(raw, garbage)
            assert await asyncio.wait_for(loop.sock_recv(raw, 100), 5) == b""  # closed
    assert await _all(client, b"2") == [b"m0", b"m1"]
    assert served.requests == [b"2"]


async def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        client = FramesClient("127.0.0.1", port)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _all(client, b"")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_server_that_goes_away_mid_call_is_unavailable(
    server: FramesServer, client: FramesClient, served: Served
) -> None:
    served.behave = Served.sleeps
    messages = client.unary_stream(METHOD, b"")
    assert await anext(messages) == b"first"
    for connection in list(server._connections):
        connection.close()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await anext(messages)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_stop_lets_running_calls_finish_within_grace_and_refuses_new_ones(
    server: FramesServer, client: FramesClient, served: Served
) -> None:
    async def brief(request: bytes, context: Any) -> None:
        await context.write(b"a")
        await asyncio.sleep(0.2)
        await context.write(b"b")

    served.behave = brief
    running = asyncio.create_task(_all(client, b""))
    await asyncio.wait_for(served.started.wait(), 5)
    other = FramesClient("127.0.0.1", server.port)
    # a connection opened before the stop: its call is refused while the server drains
    idle = await other._take()
    other._give_back(idle)
    stopping = asyncio.create_task(server.stop(5))
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _all(other, b"")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await running == [b"a", b"b"]
    await stopping
    await other.close()


async def test_a_caller_that_reads_slowly_makes_the_handler_wait(
    client: FramesClient, served: Served
) -> None:
    total, size = 20_000, 1024
    written = [0]

    async def many(request: bytes, context: Any) -> None:
        for i in range(total):
            await context.write(b"%08d" % i + bytes(size - 8))
            written[0] += 1

    served.behave = many
    messages = client.unary_stream(METHOD, b"")
    assert (await anext(messages))[:8] == b"00000000"
    last = -1
    while written[0] != last:  # until the handler stops getting on
        last = written[0]
        await asyncio.sleep(0.2)
    assert written[0] < total // 2  # held by the socket's flow control, not read into memory
    rest = [m[:8] async for m in messages]
    assert rest == [b"%08d" % i for i in range(1, total)]
    assert written[0] == total


async def test_a_call_the_server_ends_at_its_deadline_does_not_leave_its_connection_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's END at the deadline, read before the client's own timer fires and before the
    connection's end: the next call must not get that connection."""
    closing: list[frames.FrameConnection] = []

    def answer(connection: frames.FrameConnection) -> Callable[[int, bytes], None]:
        def on_frame(kind: int, payload: bytes) -> None:
            if closing:  # the second call: answered on a connection of its own
                connection.send(frames.MESSAGE, b"ok")
                connection.send(frames.END, encode_end(grpc.StatusCode.OK, "", ()))
                return
            # as FramesServer._expire: the end, then the connection closes (here a moment later)
            connection.send(
                frames.END, encode_end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ())
            )
            connection.on_frame = lambda kind, payload: None
            closing.append(connection)
            asyncio.get_running_loop().call_later(0.2, connection.close)

        return on_frame

    def accepted() -> frames.FrameConnection:
        connection = frames.FrameConnection()
        connection.on_frame = answer(connection)
        return connection

    server = await asyncio.get_running_loop().create_server(accepted, "127.0.0.1", 0)
    client = FramesClient("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _all(client, b"", timeout_s=30)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _all(client, b"", timeout_s=30) == [b"ok"]
    finally:
        await client.close()
        server.close()


async def test_a_call_whose_metadata_cannot_be_encoded_fails_without_a_connection(
    server: FramesServer, client: FramesClient
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _all(client, b"", metadata=(("x-name", "\udc80"),))
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert not server._connections and not client._idle
    assert await _all(client, b"1") == [b"m0"]
