"""Health probes on a port of their own, answered by a thread instead of the event loop.

On the service's own port a probe is one more request in the event loop's queue: with one edge
process at 256 streams on the H200 host, ``/healthz`` p99 was 76-1,007 ms there, and a kubelet
probe gives up at 1 s. With ``health_listen`` set, a ``ProbeServer`` answers ``GET /healthz`` and
``GET /readyz`` on that port from a thread of its own, so a probe never queues behind streams:

- ``/healthz``: 200 ``{"status": "ok"}`` while the event loop runs; 503 ``{"status": "stalled"}``
  once the loop has not beaten its ``Heartbeat`` for ``STALL_S`` (a blocked or wedged loop, which
  the loop's own port could not report: a probe there just times out).
- ``/readyz``: the service's readiness, read from plain state (``readiness()``, which must not
  touch the loop), and 503 as well when the loop is stalled.
- anything else: 404.

The thread runs Python, so it needs the GIL, which it gets whenever the loop's thread makes a
system call (an event loop makes them all the time) or, against pure computation, after the
interpreter's switch interval (5 ms) for each call the answer makes; hence a plain accept loop
(``ProbeServer``'s docstring). Measured on the 2-vCPU machine, a probe over loopback from another
process, with the main thread computing and making a short system call every ~20 µs: p50
1.3-1.5 ms (0.8 ms idle).

Workers of a supervisor share the port as they share the API port (``reuse_port``; the
supervisor reserves it, ``tokenrelay._workers.reserve``): the kernel gives each probe to one of
them, so a probe checks one worker, as a probe of the API port does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

from tokenrelay.config import split_hostport

__all__ = ["STALL_S", "Heartbeat", "ProbeServer", "Readiness", "readiness_answer", "serve_probes"]

STALL_S = 10.0
"""``/healthz`` fails once the event loop has run nothing for this long."""

Readiness = Callable[[], tuple[bool, str]]
"""``(ready, reason)``, called from the probe thread: it reads state, it awaits nothing."""


def readiness_answer(ready: bool, reason: str) -> tuple[int, dict[str, str]]:
    """``/readyz``'s status and body for ``(ready, reason)``, on either port."""
    return (200 if ready else 503), {"status": "ready" if ready else "not ready", "reason": reason}


class Heartbeat:
    """The event loop's last sign of life (``time.monotonic``): beaten by the loop-lag watcher
    (``tokenrelay._looplag``), read by the probe thread."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self.last


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_HEAD_MAX = 8192
_HEAD_S = 0.5  # a client's whole request head: the one thread answers one probe at a time

log = logging.getLogger(__name__)


class ProbeServer:
    """``/healthz`` and ``/readyz`` on ``host:port`` from one thread (see the module docstring).
    Binds at construction: ``OSError`` when the port is taken.

    The thread is a plain accept loop, not ``http.server``: each blocking system call gives the
    GIL away, and getting it back may wait a switch interval behind a busy loop, so an answer
    costs the fewest calls it can (accept, a read of the request head, one write, close). One
    probe per connection (HTTP/1.0, ``Connection: close``), as kubelet and curl send them; a
    client that has not sent its whole request head within 0.5 s is dropped, so that it delays
    the probes behind it by no more than that."""

    def __init__(
        self,
        host: str,
        port: int,
        heartbeat: Heartbeat,
        readiness: Readiness,
        *,
        reuse_port: bool = False,
        stall_s: float = STALL_S,
    ) -> None:
        self.heartbeat = heartbeat
        self.readiness = readiness
        self.stall_s = stall_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _stalled(self) -> tuple[int, dict[str, str]] | None:
        age = self.heartbeat.age_s()
        if age < self.stall_s:
            return None
        return 503, {"status": "stalled", "reason": f"event loop ran nothing for {age:.1f} s"}

    def health(self) -> tuple[int, dict[str, str]]:
        return self._stalled() or (200, {"status": "ok"})

    def ready(self) -> tuple[int, dict[str, str]]:
        stalled = self._stalled()
        if stalled is not None:
            return stalled[0], {"status": "not ready", "reason": stalled[1]["reason"]}
        try:
            ready, reason = self.readiness()
        except Exception as exc:  # a bug there must still give an answer
            return readiness_answer(False, f"readiness failed: {exc!r}")
        return readiness_answer(ready, reason)

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP response to a request whose head (up to its blank line) is ``head``."""
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            status, body = 405, {"status": "method not allowed", "reason": "GET or HEAD only"}
        elif path == b"/healthz":
            status, body = self.health()
        elif path == b"/readyz":
            status, body = self.ready()
        else:
            status, body = 404, {"status": "not found", "reason": "probes: /healthz, /readyz"}
        data = json.dumps(body).encode()
        header = (
            f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\nConnection: close\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "\r\n"
        ).encode()
        return header if method == b"HEAD" else header + data

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.01)  # e.g. out of descriptors: try again, without spinning
                continue
            with connection:
                try:
                    head = _read_head(connection, time.monotonic() + _HEAD_S)
                    if head:
                        connection.sendall(self.answer(head))
                except OSError:
                    pass  # the client went away or sent nothing in time: nothing to answer
                except Exception:  # a bug must not end the thread: the port would go silent
                    log.exception("probe answer failed")

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._serve, name="probes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port; blocks until the thread has ended, at most the
        answer in progress (``_HEAD_S`` for a slow client) and a little more (call it from a
        thread in async code: ``asyncio.to_thread``)."""
        self._stopping = True
        if self._thread is not None:
            # Wakes the blocked accept (Linux: it fails with EINVAL).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._thread.join(timeout=_HEAD_S + 1)  # a daemon: the process may exit without it
            self._thread = None
        self._listener.close()


def serve_probes(
    address: str, heartbeat: Heartbeat, readiness: Readiness, *, reuse_port: bool
) -> ProbeServer:
    """A ``ProbeServer`` on ``address`` (``host:port``, a service's ``health_listen``), serving;
    ``reuse_port`` for a worker, which shares the port its supervisor holds."""
    host, port = split_hostport(address)
    probes = ProbeServer(host, port, heartbeat, readiness, reuse_port=reuse_port)
    probes.start()
    return probes


def _read_head(connection: socket.socket, deadline: float) -> bytes:
    """The request's head, up to its blank line, read by ``deadline`` (else ``TimeoutError``).
    The whole head, not its first line only: closing with unread bytes would reset the
    connection (RST), and the client could lose the answer it had not read yet."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < _HEAD_MAX:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        connection.settimeout(left)
        more = connection.recv(_HEAD_MAX)
        if not more:
            break
        head += more
    return head
