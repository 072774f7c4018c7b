"""Resilience figures on real processes: two Triton nodes (synthetic model), orchestrator, edge.

    .venv/bin/python benchmarks/resilience.py [--rounds 3]

Prints, per round and summarised: how long the streams of a SIGKILLed node take to end and how
many requests that had not started streaming were lost; how precisely the first-token watchdog
fires on a SIGSTOPped node (retry included); how long a restarted node takes to get traffic back;
and the latency of 429s under a burst of 10x capacity. The chaos tests in
tests/system/test_resilience.py assert the bounds; this prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.stack import Stack, StackPorts  # noqa: E402
from tokenrelay.v1 import generation_pb2 as pb  # noqa: E402
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

FIRST_TOKEN_S, COOLDOWN_S, PROBE_S = 1.0, 1.0, 0.2
CONFIG = f"""
[orchestrator]
probe_interval_s = {PROBE_S}
[orchestrator.timeouts]
connect_s = 0.5
first_token_s = {FIRST_TOKEN_S}
[orchestrator.breaker]
cooldown_s = {COOLDOWN_S}
[orchestrator.admission]
max_concurrent = 8
max_queue = 8
queue_timeout_s = 2.0
"""


def _stack(workdir: Path) -> Stack:
    stack = Stack(REPO / "triton_models", StackPorts.free(), models=("synthetic",), nodes=2)
    config = workdir / "tokenrelay.toml"
    config.write_text(CONFIG)
    stack.config = config
    return stack.start()


async def _stream(
    stub: pb_grpc.GenerationServiceStub, tokens: int
) -> tuple[str, float, str, float]:
    """(node, time to first token, gRPC code name or "OK", monotonic time it ended)."""
    request = pb.GenerateStreamRequest(
        model="synthetic", prompt="go", sampling=pb.SamplingParams(max_tokens=tokens)
    )
    began, node, first = time.monotonic(), "", float("nan")
    try:
        async for message in stub.GenerateStream(request, timeout=30):
            if message.HasField("start"):
                node, first = message.start.served_by.node, time.monotonic() - began
    except grpc.aio.AioRpcError as exc:
        return node, first, exc.code().name, time.monotonic()
    return node, first, "OK", time.monotonic()


async def kill(stack: Stack, stub: pb_grpc.GenerationServiceStub) -> dict[str, float]:
    victim = stack.nodes[0]
    streams = [asyncio.create_task(_stream(stub, 150)) for _ in range(8)]
    await asyncio.sleep(0.5)
    killed = time.monotonic()
    victim.kill()
    fresh = await asyncio.gather(*(_stream(stub, 10) for _ in range(8)))
    ended = []
    for node, _, code, at in await asyncio.gather(*streams):
        if node == victim.grpc:
            ended.append(at - killed)
            assert code == "UNAVAILABLE", code
    return {
        "victim_streams_ended_max_s": max(ended),
        "new_requests_lost": sum(code != "OK" for _, _, code, _ in fresh),
    }


async def stop(stack: Stack, stub: pb_grpc.GenerationServiceStub) -> dict[str, float]:
    hung = stack.nodes[1]
    hung.pause()
    try:
        outcomes = await asyncio.gather(*(_stream(stub, 10) for _ in range(4)))
    finally:
        hung.resume()
    late = [first - FIRST_TOKEN_S for _, first, _, _ in outcomes if first > FIRST_TOKEN_S * 0.9]
    return {
        "watchdog_retried": len(late),
        "watchdog_overshoot_max_ms": 1000 * max(late),
        "watchdog_requests_lost": sum(code != "OK" for _, _, code, _ in outcomes),
    }


async def restart(stack: Stack, stub: pb_grpc.GenerationServiceStub) -> dict[str, float]:
    victim = stack.nodes[0]
    victim.start()
    back = time.monotonic()
    node = ""
    while node != victim.grpc:  # back-to-back one-token requests until one lands there
        node, _, _, _ = await _stream(stub, 1)
    return {"traffic_back_after_ready_s": time.monotonic() - back}


async def burst(stack: Stack) -> dict[str, float]:
    """160 requests at once through the edge (aiohttp client: httpx's pool is the bottleneck
    at this concurrency and would be measured instead)."""
    body = {"model": "synthetic", "prompt": "go", "max_tokens": 10}

    async def one(http: aiohttp.ClientSession) -> tuple[int, float]:
        began = time.monotonic()
        async with http.post("/v1/completions", json=body) as response:
            await response.read()
        return response.status, time.monotonic() - began

    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(stack.edge_url, connector=connector) as http:
        results = await asyncio.gather(*(one(http) for _ in range(160)))
    refused = sorted(t for status, t in results if status == 429)
    return {
        "burst_ok": sum(status == 200 for status, _ in results),
        "burst_429": len(refused),
        "burst_429_p50_ms": 1000 * statistics.median(refused),
        "burst_429_p99_ms": 1000 * refused[max(0, int(len(refused) * 0.99) - 1)],
    }


async def round_(stack: Stack) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        figures |= await kill(stack, stub)
        figures |= await restart(stack, stub)
        figures |= await stop(stack, stub)
    figures |= await burst(stack)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as workdir:
            stack = _stack(Path(workdir))
            try:
                rows.append(asyncio.run(round_(stack)))
            finally:
                stack.stop()
        print(f"round {i + 1}: " + ", ".join(f"{k}={v:.3g}" for k, v in rows[-1].items()))
    print("\n| figure | median | worst |\n|---|---|---|")
    for key in rows[0]:
        values = [row[key] for row in rows]
        worst = min(values) if key == "burst_ok" else max(values)
        print(f"| {key} | {statistics.median(values):.3g} | {worst:.3g} |")


if __name__ == "__main__":
    main()
