"""What a bare grpc.aio hop costs on this host: the floor under the relay's added time to first
token. No tokenrelay code runs: one process serves a unary-stream method that answers two small
messages, an optional second one relays the call to it (as the orchestrator relays the edge's
call to Triton), and a client times each call to its first message.

    .venv/bin/python benchmarks/grpc_hops.py [--calls 300] [--layouts "1:-:-:-,2:2:4:8"]

A layout is ``HOPS:BACKEND:PROXY:CLIENT`` cores for ``taskset``-style pinning (``-``: not pinned;
``0-3``: a range): each process and every thread of it runs there. Between calls the client
sleeps 2 ms, so that each call starts on quiet threads, as a lone interactive request does.
Figures only: p50 and p90 of call → first message, per layout, in the order given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from tokenrelay._affinity import parse_cpus


def _cores(text: str) -> set[int] | None:
    return None if text == "-" else set(parse_cpus(text))


def _serve(port: int, upstream: int) -> None:
    import grpc

    async def main() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{upstream}") if upstream else None
        call_upstream = channel.unary_stream("/hop.Hop/Call") if channel else None

        async def handler(request: bytes, context: object) -> AsyncIterator[bytes]:
            if call_upstream is None:
                yield b"x" * 40
                yield b"y" * 40
                return
            async for message in call_upstream(request):
                yield message

        handlers = {"Call": grpc.unary_stream_rpc_method_handler(handler)}
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("hop.Hop", handlers),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _client(port: int, calls: int) -> list[float]:
    import grpc

    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_stream("/hop.Hop/Call")

            async def one() -> float:
                began, first = time.perf_counter(), None
                async for _ in method(b"request"):
                    if first is None:
                        first = time.perf_counter() - began
                assert first is not None
                return first

            for _ in range(50):  # warm-up: the connection, the threads
                await one()
            out = []
            for _ in range(calls):
                out.append(await one())
                await asyncio.sleep(0.002)
            return out

    return asyncio.run(main())


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


def run_layout(layout: str, calls: int) -> tuple[float, float]:
    hops, backend, proxy, client = layout.split(":")
    backend_port = _free_port()
    servers = [_spawn(_cores(backend), "serve", str(backend_port), "0")]
    port = backend_port
    try:
        _wait_port(backend_port)
        if hops == "2":
            port = _free_port()
            servers.append(_spawn(_cores(proxy), "serve", str(port), str(backend_port)))
            _wait_port(port)
        cores = _cores(client)
        if cores is not None:
            os.sched_setaffinity(0, cores)
        samples = sorted(_client(port, calls))
    finally:
        for server in servers:
            server.kill()
            server.wait()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return statistics.median(samples), samples[int(0.9 * len(samples))]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--layouts",
        default="1:-:-:-,1:2:-:8,1:0-3:-:8,2:-:-:-,2:4:2:8,2:8:2-5:9,2:2:2:8",
        help="HOPS:BACKEND:PROXY:CLIENT cores, comma-separated (cores missing here are dropped)",
    )
    args = parser.parse_args()
    count = os.cpu_count() or 1
    print(f"{'layout (hops:backend:proxy:client)':38s} first message p50 / p90 (µs)")
    for layout in args.layouts.split(","):
        if any(c >= count for part in layout.split(":")[1:] for c in (_cores(part) or ())):
            print(f"{layout:38s} skipped: this machine has {count} cores")
            continue
        p50, p90 = run_layout(layout, args.calls)
        print(f"{layout:38s} {p50 * 1e6:6.0f} / {p90 * 1e6:6.0f}", flush=True)


if __name__ == "__main__":
    main()
