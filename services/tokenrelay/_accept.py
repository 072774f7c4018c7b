"""A listening TCP socket whose waiting connections are accepted together, not one a loop pass.

libuv accepts one connection each time the loop polls a listening socket (since libuv 1.45:
libuv/libuv#3696, "don't accept() connections in a loop"), and uvloop serves
``loop.create_server`` through it. On a busy loop a pass takes tens of milliseconds, so a burst
of new connections waits in the kernel's accept queue for as many passes as there are
connections: measured on tokenrelay's frames port at 256 streams, the edge's new connections
waited up to 2.2 s to be accepted (one fewer in the queue every ~50 ms), which was the whole of
the time-to-first-token tail there. asyncio's own loop accepts up to the backlog a pass, and so
does this: the socket is read with ``add_reader`` and every connection waiting (up to
``_BATCH``) is accepted and handed to ``loop.connect_accepted_socket``.

Each service process has its own listening socket (``SO_REUSEPORT`` between workers, see
``_workers``), so taking every waiting connection does not starve another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable

__all__ = ["LISTEN_BACKLOG", "Listener", "listen"]

log = logging.getLogger(__name__)

# The listen queue: hundreds of clients connecting at once (a load test's start, a reconnect
# storm, one frames connection per concurrent stream) overflowed aiohttp's 128 and asyncio's 100,
# and each SYN dropped waited a second for its retransmit, which showed as a cluster of first
# tokens near 1 s (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
_BATCH = 256  # connections accepted in one pass at most (the rest: the next pass)
_RETRY_S = 1.0  # out of file descriptors or memory: stop accepting this long, as asyncio does
_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener:
    """What callers use of ``asyncio.Server``: ``sockets``, ``close()`` and ``wait_closed()``."""

    def __init__(
        self,
        socks: list[socket.socket],
        factory: Callable[[], asyncio.BaseProtocol],
        ssl: ssl_module.SSLContext | None,
    ) -> None:
        self._socks = socks
        self._factory = factory
        self._ssl = ssl
        self._loop = asyncio.get_running_loop()
        self._opening: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._resume()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else tuple(self._socks)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while it waited: the next one
                continue
            except OSError as exc:
                if exc.errno not in _RESOURCES:
                    raise
                log.error(
                    "not accepting connections for a while: out of resources",
                    extra={"fields": {"error": str(exc), "retry_s": _RETRY_S}},
                )
                for listening in self._socks:
                    self._loop.remove_reader(listening.fileno())
                self._retry = self._loop.call_later(_RETRY_S, self._resume)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            for sock in self._socks:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except (OSError, ssl_module.SSLError) as exc:  # a reset, a failed TLS handshake
            log.debug("connection dropped while opening", extra={"fields": {"error": str(exc)}})
            conn.close()

    def close(self) -> None:
        """Stop listening; connections already open carry on (as ``asyncio.Server.close``)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._socks:
            with contextlib.suppress(ValueError, OSError):  # the loop may be closing too
                self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        """Wait for connections being opened (a TLS handshake) to be handed over or dropped."""
        if self._opening:
            await asyncio.wait(list(self._opening))


async def listen(
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    *,
    backlog: int = LISTEN_BACKLOG,
    reuse_port: bool = False,
    ssl: ssl_module.SSLContext | None = None,
) -> Listener:
    """Listen on ``host:port`` and give each connection a protocol made by ``factory``.
    ``port`` 0: a free one (``sockets[0]`` says which). Like ``loop.create_server``, an empty
    ``host`` listens on every address family, and an IPv6 address on IPv6 only."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return Listener(socks, factory, ssl)
