"""CPU per message read from Triton streams, by client: the orchestrator's ``H2Channel``
(``orchestrator/_h2.py``, ``triton_streams = "h2"``) against ``grpc.aio`` (``"grpc"``).

    .venv/bin/python benchmarks/h2_read.py [--streams 64] [--tokens 64] [--rounds 10] [--runs 3]
        [--token-interval-ms 0]

A fast source (``benchmarks/fastsource.py``, Triton's bytes; one response per token) runs in a
process of its own; this process is the orchestrator's reading side only: ``--streams`` calls at
once of ``ModelStreamInfer`` for ``--tokens`` tokens each, every response parsed
(``ModelStreamInferResponse``) and decoded as the orchestrator decodes it (``_decode``),
``--rounds`` times. Figures: this process's CPU time per message (every thread counted:
``grpc.aio`` has a poller thread) and messages/s, the clients alternating run by run (``--runs``
each). On the services' loop (uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay._loop import run  # noqa: E402
from tokenrelay.orchestrator._h2 import H2Channel  # noqa: E402
from tokenrelay.orchestrator._triton import (  # noqa: E402
    _OUTPUTS,
    _SERVICE,
    _STREAM_ERRORS,
    _bool_input,
    _bytes_input,
    _decode,
    _infer_request,
)

_METHOD = _SERVICE + "ModelStreamInfer"
_PARSE = service_pb2.ModelStreamInferResponse.FromString


def _request(index: int, tokens: int) -> Any:
    inputs = [
        _bytes_input("text_input", "hello"),
        _bool_input("stream", True),
        _bytes_input("sampling_parameters", json.dumps({"max_tokens": tokens})),
        _bool_input("exclude_input_in_output", True),
        _bool_input("return_finish_reason", True),
        _bool_input("return_num_input_tokens", True),
        _bool_input("return_num_output_tokens", True),
    ]
    return _infer_request("synthetic", f"r{index}", inputs, _OUTPUTS)


async def _h2(address: str, args: argparse.Namespace) -> int:
    channel = H2Channel(address, 5.0)

    async def one(index: int) -> int:
        stream = await channel.stream(
            _METHOD, _request(index, args.tokens).SerializeToString(), (_STREAM_ERRORS,)
        )
        count = 0
        while (raw := await stream.read()) is not None:
            count += 1
            _, final = _decode(_PARSE(raw).infer_response)
            if final:
                stream.let_end(1.0)
                break
        return count

    try:
        return await _rounds(one, args)
    finally:
        await channel.close()


async def _grpc(address: str, args: argparse.Namespace) -> int:
    channel = grpc.aio.insecure_channel(address)
    method = channel.unary_stream(
        _METHOD,
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=_PARSE,
    )

    async def one(index: int) -> int:
        call = method(_request(index, args.tokens), metadata=(_STREAM_ERRORS,))
        count = 0
        while (message := await call.read()) is not grpc.aio.EOF:
            count += 1
            _, final = _decode(message.infer_response)
            if final:
                break
        await call.code()
        return count

    try:
        return await _rounds(one, args)
    finally:
        await channel.close()


async def _rounds(one: Any, args: argparse.Namespace) -> int:
    total = 0
    for _ in range(args.rounds):
        counts = await asyncio.gather(*(one(i) for i in range(args.streams)))
        total += sum(counts)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--token-interval-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    source = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fastsource.py"),
            "--port",
            "0",
            "--token-interval-ms",
            str(args.token_interval_ms),
            "--stream-interval",
            "ignore",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert source.stdout is not None
        line = source.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"the fast source did not start: {line!r}")
        address = f"127.0.0.1:{line.split()[-1]}"
        clients = {"h2": _h2, "grpc": _grpc}
        run(clients["h2"](address, argparse.Namespace(**{**vars(args), "rounds": 1})))  # warm
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
        order = ["grpc", "h2"]
        for index in range(args.runs):
            for name in order if index % 2 == 0 else order[::-1]:
                cpu, wall = time.process_time(), time.perf_counter()
                messages = run(clients[name](address, args))
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
