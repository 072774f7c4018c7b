"""The services' listening sockets (``tokenrelay._accept``): every connection waiting is accepted
in the loop pass that sees them, on uvloop (whose ``create_server`` accepts one a pass) and on
asyncio's loop; connections work, close stops listening, and running out of descriptors pauses
accepting instead of failing the loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import pytest
import uvloop

from tokenrelay import _accept
from tokenrelay._accept import Listener, listen

_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def _run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=_LOOPS[loop]) as runner:
        runner.run(main)


class _Echo(asyncio.Protocol):
    made: ClassVar[list[int]] = []  # the loop pass each connection was made in
    all_made: ClassVar[asyncio.Event | None] = None  # set once 20 are

    def __init__(self, passes: list[int] | None = None) -> None:
        self._passes = passes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._passes is not None:
            _Echo.made.append(self._passes[0])
            if len(_Echo.made) == 20 and _Echo.all_made is not None:
                _Echo.all_made.set()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize("loop", sorted(_LOOPS))
def test_a_burst_of_connections_is_accepted_in_one_busy_pass(loop: str) -> None:
    """20 connections arrive while every loop pass takes 20 ms: all are accepted within two
    passes (with uvloop's create_server: one a pass, 20 passes)."""

    async def main() -> None:
        passes = [0]
        _Echo.made = []
        _Echo.all_made = asyncio.Event()
        server = await listen(lambda: _Echo(passes), "127.0.0.1", 0, backlog=128)
        port = server.sockets[0].getsockname()[1]
        stop = False

        async def busy() -> None:
            while not stop:
                time.sleep(0.02)  # noqa: ASYNC251  (a loaded loop: each pass does this much work)
                passes[0] += 1
                await asyncio.sleep(0)

        worker = asyncio.ensure_future(busy())
        await asyncio.sleep(0.05)
        clients = []
        for _ in range(20):  # blocking connects: the kernel completes them, all 20 wait
            client = socket.create_connection(("127.0.0.1", port))
            clients.append(client)
        first = passes[0]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_Echo.all_made.wait(), 5)
        stop = True
        await worker
        server.close()
        for client in clients:
            client.close()
        assert len(_Echo.made) == 20
        assert max(_Echo.made) - first <= 3, _Echo.made  # uvloop's own: first + 20

    _run(loop, main())


@pytest.mark.parametrize("loop", sorted(_LOOPS))
def test_connections_work_and_close_stops_listening(loop: str) -> None:
    async def main() -> None:
        server = await listen(_Echo, "127.0.0.1", 0, backlog=16)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await _connect(port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        server.close()
        assert server.sockets == ()
        await server.wait_closed()
        with pytest.raises(OSError):  # nobody listens any more
            await _connect(port)
        writer.write(b"still")  # an open connection carries on
        assert await reader.readexactly(5) == b"still"
        writer.close()

    _run(loop, main())


def test_accepted_sockets_have_nodelay() -> None:
    accepted: list[socket.socket] = []

    async def main() -> None:
        made = asyncio.Event()

        class _Keep(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.append(transport.get_extra_info("socket"))
                made.set()

        server = await listen(_Keep, "127.0.0.1", 0, backlog=16)
        _, writer = await _connect(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(made.wait(), 5)
        assert accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        writer.close()
        server.close()

    _run("uvloop", main())


def test_out_of_descriptors_pauses_accepting_then_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EMFILE from accept(): the listener stops reading the socket for _RETRY_S (as asyncio
    does) instead of failing on every pass, and accepts the waiting connection after it."""
    monkeypatch.setattr(_accept, "_RETRY_S", 0.2)

    class _Exhausted(socket.socket):
        failures = 1

        def accept(self) -> tuple[socket.socket, Any]:
            if _Exhausted.failures:
                _Exhausted.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    async def main() -> None:
        sock = _Exhausted(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        made: list[float] = []
        arrived = asyncio.Event()

        class _Note(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(time.monotonic())
                arrived.set()

        server = Listener([sock], _Note, None)
        started = time.monotonic()
        _, writer = await _connect(sock.getsockname()[1])
        await asyncio.wait_for(arrived.wait(), 5)
        assert made[0] - started >= 0.15  # accepted after the pause, not before
        writer.close()
        server.close()

    _run("asyncio", main())


def test_an_empty_host_listens_on_every_family_and_a_name_resolves() -> None:
    async def main() -> None:
        server = await listen(_Echo, "localhost", 0, backlog=16)
        assert server.sockets and server.sockets[0].family in (socket.AF_INET, socket.AF_INET6)
        server.close()
        everywhere = await listen(_Echo, "", 0, backlog=16)
        families = {s.family for s in everywhere.sockets}
        assert socket.AF_INET in families
        everywhere.close()

    _run("uvloop", main())
