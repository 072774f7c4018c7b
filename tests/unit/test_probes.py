"""The probe port (``tokenrelay._probes``): answers from a thread of its own, so that a probe gets
an answer while the event loop is busy or blocked, and says when the loop has stalled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Histogram

from tokenrelay._looplag import watch_loop_lag
from tokenrelay._probes import Heartbeat, ProbeServer
from tokenrelay._workers import reserve


def _get(port: int, path: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class _Ready:
    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (True, "ready")

    def __call__(self) -> tuple[bool, str]:
        return self.answer


@pytest.fixture
def ready() -> _Ready:
    return _Ready()


@pytest.fixture
def heartbeat() -> Heartbeat:
    return Heartbeat()


@pytest.fixture
def probes(heartbeat: Heartbeat, ready: _Ready) -> Iterator[ProbeServer]:
    server = ProbeServer("127.0.0.1", 0, heartbeat, ready)
    server.start()
    yield server
    server.stop()


def test_healthz_is_ok_while_the_loop_beats(probes: ProbeServer) -> None:
    assert _get(probes.port, "/healthz") == (200, {"status": "ok"})


def test_healthz_and_readyz_fail_once_the_loop_has_stalled(
    probes: ProbeServer, heartbeat: Heartbeat
) -> None:
    heartbeat.last = time.monotonic() - 12  # longer than STALL_S (10 s)
    status, body = _get(probes.port, "/healthz")
    assert status == 503 and body["status"] == "stalled"
    assert "event loop ran nothing for 12" in body["reason"]
    status, body = _get(probes.port, "/readyz")
    assert status == 503 and body["status"] == "not ready"
    heartbeat.beat()
    assert _get(probes.port, "/healthz")[0] == 200


def test_readyz_says_what_readiness_says(probes: ProbeServer, ready: _Ready) -> None:
    assert _get(probes.port, "/readyz") == (200, {"status": "ready", "reason": "ready"})
    ready.answer = (False, "draining")
    assert _get(probes.port, "/readyz") == (503, {"status": "not ready", "reason": "draining"})


def test_a_readiness_that_raises_is_not_ready_and_the_server_goes_on(
    heartbeat: Heartbeat,
) -> None:
    def broken() -> tuple[bool, str]:
        raise KeyError("upstream")

    server = ProbeServer("127.0.0.1", 0, heartbeat, broken)
    server.start()
    try:
        status, body = _get(server.port, "/readyz")
        assert status == 503 and "readiness failed" in body["reason"]
        assert _get(server.port, "/healthz")[0] == 200
    finally:
        server.stop()


def test_other_paths_are_not_found(probes: ProbeServer) -> None:
    assert _get(probes.port, "/v1/models")[0] == 404


def test_a_probe_is_answered_while_the_event_loop_is_blocked(probes: ProbeServer) -> None:
    # On the API port this probe would wait until the loop ran again.
    answered = threading.Event()
    results: list[tuple[int, dict[str, str]]] = []

    def probe() -> None:
        results.append(_get(probes.port, "/healthz"))
        answered.set()

    async def blocked() -> bool:
        threading.Thread(target=probe).start()
        return answered.wait(timeout=10)  # the loop's thread blocks here, on purpose

    assert asyncio.run(blocked())
    assert results == [(200, {"status": "ok"})]


async def test_the_loop_lag_watcher_beats_the_heartbeat() -> None:
    beat = Heartbeat()
    beat.last = time.monotonic() - 60
    histogram = Histogram("lag", "lag", registry=CollectorRegistry())
    task = asyncio.create_task(watch_loop_lag(histogram, interval_s=0.01, beat=beat))
    try:
        await asyncio.sleep(0.2)
        assert beat.age_s() < 1
    finally:
        task.cancel()


def test_workers_share_the_port_their_supervisor_holds(heartbeat: Heartbeat) -> None:
    holder = reserve("127.0.0.1", 0)
    port = int(holder.getsockname()[1])
    servers = [
        ProbeServer("127.0.0.1", port, heartbeat, lambda: (True, "ready"), reuse_port=True)
        for _ in range(2)
    ]
    try:
        for server in servers:
            server.start()
        assert all(_get(port, "/healthz")[0] == 200 for _ in range(8))
    finally:
        for server in servers:
            server.stop()
        holder.close()


def test_a_taken_port_is_refused_and_a_stopped_server_frees_it(heartbeat: Heartbeat) -> None:
    server = ProbeServer("127.0.0.1", 0, heartbeat, lambda: (True, "ready"))
    server.start()
    port = server.port
    with pytest.raises(OSError):
        ProbeServer("127.0.0.1", port, heartbeat, lambda: (True, "ready"))
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_request_head_that_arrives_in_pieces_is_read_whole_and_answered(
    probes: ProbeServer,
) -> None:
    with socket.create_connection(("127.0.0.1", probes.port), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n")
        time.sleep(0.2)
        client.sendall(b"User-Agent: kube-probe/1.31\r\n\r\n")
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and json.loads(body) == {"status": "ok"}


def test_a_client_that_trickles_its_request_does_not_hold_the_probes_behind_it(
    probes: ProbeServer,
) -> None:
    # One thread answers one probe at a time: a client that sends a byte now and then (or
    # nothing) is dropped once its head is late, and the probes behind it are answered.
    stop = threading.Event()
    trickler = socket.create_connection(("127.0.0.1", probes.port))

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                trickler.send(b"G")

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(0.1)
        assert _get(probes.port, "/healthz") == (200, {"status": "ok"})  # within _get's 5 s
    finally:
        stop.set()
        thread.join()
        trickler.close()
