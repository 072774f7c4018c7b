"""CPU per message read from Triton streams, by client: a ``TritonNode`` reading through the
orchestrator's ``H2Channel`` (``orchestrator/_h2.py``, ``triton_streams = "h2"``) against one
reading through ``grpc.aio`` (``"grpc"``).

    .venv/bin/python benchmarks/h2_read.py [--streams 64] [--tokens 64] [--rounds 10] [--runs 3]
        [--token-interval-ms 0]

A fast source (``benchmarks/fastsource.py``, Triton's bytes; one response per token) runs in a
process of its own; this process is the orchestrator's reading side only: ``--streams``
generations at once (``TritonNode.generate``: the orchestrator's request, every response parsed
and decoded into a ``Delta``) of ``--tokens`` tokens each, ``--rounds`` times. Figures: this
process's CPU time per message (every thread counted: ``grpc.aio`` has a poller thread) and
messages/s, the clients alternating run by run (``--runs`` each). On the services' loop (uvloop
when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from loadgen import _start_fast_source  # noqa: E402

from tokenrelay._loop import run  # noqa: E402
from tokenrelay.config import Timeouts  # noqa: E402
from tokenrelay.generation import Sampling  # noqa: E402
from tokenrelay.orchestrator._triton import TritonNode  # noqa: E402

CLIENTS = ("grpc", "h2")


async def _read(address: str, client: str, args: argparse.Namespace, rounds: int) -> int:
    """Messages read in ``rounds`` rounds of ``args.streams`` generations at once."""
    node = TritonNode(address, Timeouts(), streams=client)
    sampling = Sampling(max_tokens=args.tokens)

    async def one(index: int) -> int:
        deltas = node.generate("synthetic", "hello", sampling, f"r{index}")
        return sum([1 async for _ in deltas])

    try:
        total = 0
        for _ in range(rounds):
            total += sum(await asyncio.gather(*(one(i) for i in range(args.streams))))
        return total
    finally:
        await node.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--token-interval-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    source, address = _start_fast_source(args.token_interval_ms, "ignore")
    try:
        run(_read(address, "h2", args, 1))  # warm
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
        for index in range(args.runs):
            for name in CLIENTS if index % 2 == 0 else CLIENTS[::-1]:
                cpu, wall = time.process_time(), time.perf_counter()
                messages = run(_read(address, name, args, args.rounds))
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                figures[name].append((1e6 * cpu / messages, messages / wall))
                print(
                    f"{name:5} {messages} messages: {1e6 * cpu / messages:6.1f} µs CPU a message,"
                    f" {messages / wall:8.0f} messages/s",
                    flush=True,
                )
        for name, runs in figures.items():
            print(
                f"{name:5} median: {statistics.median(c for c, _ in runs):6.1f} µs CPU a message,"
                f" {statistics.median(r for _, r in runs):8.0f} messages/s"
            )
    finally:
        source.terminate()
        source.wait(10)


if __name__ == "__main__":
    main()
