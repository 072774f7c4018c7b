"""What one hop between processes costs on this host, by transport: the floor under the relay's
added time to first token and under its CPU per relayed message. No tokenrelay code runs: one
process serves a unary-stream method, an optional second one relays each call to it (as the
orchestrator relays the edge's call to Triton), and a client times each call to its first message.

    .venv/bin/python benchmarks/grpc_hops.py [--calls 300] [--layouts "1:-:-:-,2:2:4:8"]
        [--transports grpc,frames] [--stream-messages 20000] [--loop auto]

Transports:

- ``grpc``: grpc.aio, a unary-stream method (what the relay's two hops are today);
- ``frames``: length-prefixed frames over one TCP connection per client, calls multiplexed by a
  stream id, on the event loop alone (an ``asyncio.Protocol``; no threads of a library's own).
  A candidate for the edge → orchestrator hop, measured here before it is built: the proxy runs
  each call in a task of its own that reads the upstream call's messages from a queue and writes
  them on, as a servicer would.

A layout is ``HOPS:BACKEND:PROXY:CLIENT`` cores for ``taskset``-style pinning (``-``: not pinned;
``0-3``: a range): each process and every thread of it runs there. Between calls the client
sleeps 2 ms, so that each call starts on quiet threads, as a lone interactive request does.
Every process runs on the services' loop (``--loop``, uvloop when installed). Figures only: per
transport and layout, p50 and p90 of call → first message; with ``--stream-messages N``, one call
streaming N small messages as fast as the backend writes them: messages/s at the client and the
proxy's CPU per message (what a relayed token costs that process at one token per message).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from tokenrelay import _loop
from tokenrelay._affinity import parse_cpus

# frames: stream id, kind, payload length; then the payload.
_HEADER = struct.Struct("<IBI")
_OPEN, _MESSAGE, _END = 0, 1, 2
_FIRST, _SECOND = b"x" * 40, b"y" * 40


def _cores(text: str) -> set[int] | None:
    return None if text == "-" else set(parse_cpus(text))


def _count(request: bytes) -> int:
    """How many messages a call asks for: two, or the number it names (``stream:N``)."""
    return int(request[7:]) if request.startswith(b"stream:") else 2


class _Frames(asyncio.Protocol):
    """One connection's frames: ``on_frame(stream, kind, payload)`` for each that arrives."""

    def __init__(self, on_frame: object) -> None:
        self._on_frame = on_frame
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= _HEADER.size:
            stream, kind, length = _HEADER.unpack_from(buffer, offset)
            end = offset + _HEADER.size + length
            if end > size:
                break
            self._on_frame(stream, kind, bytes(buffer[offset + _HEADER.size : end]))  # type: ignore[operator]
            offset = end
        del buffer[:offset]

    def send(self, stream: int, kind: int, payload: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.write(_HEADER.pack(stream, kind, len(payload)) + payload)

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    async def drain(self) -> None:
        if self._paused is not None:
            await self._paused


async def _serve_frames(port: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    up: _Frames | None = None
    queues: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
    if upstream:
        up = _Frames(lambda s, k, p: queues[s].put_nowait((k, p)))
        await loop.create_connection(lambda: up, "127.0.0.1", upstream)
    next_id = iter(range(1, 1 << 31))

    async def relay(client: _Frames, stream: int, request: bytes) -> None:
        assert up is not None
        mine = next(next_id)
        queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        queues[mine] = queue
        up.send(mine, _OPEN, request)
        try:
            while True:
                kind, payload = await queue.get()
                client.send(stream, kind, payload)
                if kind == _END:
                    return
                await client.drain()
        finally:
            del queues[mine]

    async def answer(client: _Frames, stream: int, request: bytes) -> None:
        for i in range(_count(request)):
            client.send(stream, _MESSAGE, _FIRST if i % 2 == 0 else _SECOND)
            await client.drain()
        client.send(stream, _END)

    running: set[asyncio.Task[None]] = set()

    def connection() -> _Frames:
        def on_frame(stream: int, kind: int, payload: bytes) -> None:
            if kind == _OPEN:
                work = relay if up is not None else answer
                task = loop.create_task(work(client, stream, payload))
                running.add(task)
                task.add_done_callback(running.discard)

        client = _Frames(on_frame)
        return client

    server = await loop.create_server(connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def _serve_grpc(port: int, upstream: int) -> None:
    import grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{upstream}") if upstream else None
    call_upstream = channel.unary_stream("/hop.Hop/Call") if channel else None

    async def handler(request: bytes, context: object) -> AsyncIterator[bytes]:
        if call_upstream is None:
            for i in range(_count(request)):
                yield _FIRST if i % 2 == 0 else _SECOND
            return
        async for message in call_upstream(request):
            yield message

    handlers = {"Call": grpc.unary_stream_rpc_method_handler(handler)}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hop.Hop", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class _GrpcClient:
    def __init__(self, port: int) -> None:
        import grpc

        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._method = self._channel.unary_stream("/hop.Hop/Call")

    async def call(self, request: bytes) -> tuple[float, int]:
        began, first, count = time.perf_counter(), None, 0
        async for _ in self._method(request):
            if first is None:
                first = time.perf_counter() - began
            count += 1
        assert first is not None
        return first, count

    async def close(self) -> None:
        await self._channel.close()


class _FramesClient:
    def __init__(self, port: int) -> None:
        self._port = port
        self._calls: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
        self._ids = iter(range(1, 1 << 31))
        self._frames = _Frames(lambda s, k, p: self._calls[s].put_nowait((k, p)))

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self._frames, "127.0.0.1", self._port)

    async def call(self, request: bytes) -> tuple[float, int]:
        stream = next(self._ids)
        queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._calls[stream] = queue
        began, first, count = time.perf_counter(), None, 0
        self._frames.send(stream, _OPEN, request)
        try:
            while True:
                kind, _ = await queue.get()
                if kind == _END:
                    break
                if first is None:
                    first = time.perf_counter() - began
                count += 1
        finally:
            del self._calls[stream]
        assert first is not None
        return first, count

    async def close(self) -> None:
        if self._frames.transport is not None:
            self._frames.transport.close()


async def _connect(transport: str, port: int) -> _GrpcClient | _FramesClient:
    if transport == "grpc":
        return _GrpcClient(port)
    client = _FramesClient(port)
    await client.connect()
    return client


def _client(transport: str, port: int, calls: int, loop: str) -> list[float]:
    async def main() -> list[float]:
        client = await _connect(transport, port)
        try:
            for _ in range(50):  # warm-up: the connection, the threads
                await client.call(b"request")
            out = []
            for _ in range(calls):
                out.append((await client.call(b"request"))[0])
                await asyncio.sleep(0.002)
            return out
        finally:
            await client.close()

    return _loop.run(main(), loop)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stream(transport: str, port: int, messages: int, proxy: int, loop: str) -> tuple[float, float]:
    """One call of ``messages`` messages (after a short one to warm up): messages/s at the client
    and the proxy's CPU per message (µs)."""

    async def main() -> tuple[float, float]:
        client = await _connect(transport, port)
        try:
            await client.call(b"stream:1000")
            cpu, began = _cpu_s(proxy), time.perf_counter()
            _, count = await client.call(b"stream:%d" % messages)
            elapsed, used = time.perf_counter() - began, _cpu_s(proxy) - cpu
            assert count == messages
            return count / elapsed, used / count * 1e6
        finally:
            await client.close()

    return _loop.run(main(), loop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(cores: set[int] | None, *argv: str) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)

    return subprocess.Popen([sys.executable, __file__, *argv], preexec_fn=pin)


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def run_layout(
    transport: str, layout: str, calls: int, messages: int, loop: str
) -> tuple[float, float, tuple[float, float] | None]:
    hops, backend, proxy, client = layout.split(":")
    backend_port = _free_port()
    servers = [_spawn(_cores(backend), "serve", transport, str(backend_port), "0", loop)]
    port = backend_port
    try:
        _wait_port(backend_port)
        if hops == "2":
            port = _free_port()
            servers.append(
                _spawn(_cores(proxy), "serve", transport, str(port), str(backend_port), loop)
            )
            _wait_port(port)
        cores = _cores(client)
        if cores is not None:
            os.sched_setaffinity(0, cores)
        samples = sorted(_client(transport, port, calls, loop))
        stream = _stream(transport, port, messages, servers[-1].pid, loop) if messages else None
    finally:
        for server in servers:
            server.kill()
            server.wait()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return statistics.median(samples), samples[int(0.9 * len(samples))], stream


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        transport, port, upstream, loop = (
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            sys.argv[5],
        )
        serve = _serve_grpc if transport == "grpc" else _serve_frames
        _loop.run(serve(port, upstream), loop)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--layouts",
        default="1:-:-:-,1:2:-:8,1:0-3:-:8,2:-:-:-,2:4:2:8,2:8:2-5:9,2:2:2:8",
        help="HOPS:BACKEND:PROXY:CLIENT cores, comma-separated (cores missing here are dropped)",
    )
    parser.add_argument("--transports", default="grpc,frames")
    parser.add_argument(
        "--stream-messages", type=int, default=0, help="also time one call of N messages"
    )
    parser.add_argument(
        "--loop", default="auto", help="auto (uvloop if installed), uvloop, asyncio"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="transports alternate, round by round"
    )
    args = parser.parse_args()
    count = os.cpu_count() or 1
    print(
        f"{'transport':9s} {'layout (hops:backend:proxy:client)':36s} first message p50 / p90 (µs)"
        + ("   stream msg/s   server CPU µs/msg" if args.stream_messages else "")
    )
    for _ in range(args.rounds):
        for layout in args.layouts.split(","):
            if any(c >= count for part in layout.split(":")[1:] for c in (_cores(part) or ())):
                print(f"{'':9s} {layout:36s} skipped: this machine has {count} cores")
                continue
            for transport in args.transports.split(","):
                p50, p90, stream = run_layout(
                    transport, layout, args.calls, args.stream_messages, args.loop
                )
                line = f"{transport:9s} {layout:36s} {p50 * 1e6:6.0f} / {p90 * 1e6:6.0f}"
                if stream is not None:
                    line += f"   {stream[0]:12,.0f}   {stream[1]:8.1f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
