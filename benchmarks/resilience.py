"""Resilience figures on real processes: two Triton nodes (synthetic model), orchestrator, edge.

    .venv/bin/python benchmarks/resilience.py [--runs 20] [--stop-runs 5] [--rounds 3]

Prints:

- **continuation** (``--runs`` times): a 200-token chat stream through the edge (SSE, as a
  client reads it), its serving node SIGKILLed after the fifth content chunk (then restarted):
  client-visible failures (an error event, no finish reason, a text other than the
  uninterrupted run's — the synthetic model continues greedily, so the spliced text must equal
  it), and the gap in the token stream at the splice (the fifth chunk → the sixth) against the
  gaps elsewhere in the stream; ``--stop-runs`` times the same with SIGSTOP (hung: found by the
  readiness probe);
- **hung waiters** (``--rounds`` times): a node SIGSTOPped, four requests sent: when those that
  went to it get their first token from the other node, against the target
  ``probe_interval_s + connect_s + 0.25 s`` (the first-token watchdog is a minute here, so the
  probe is what moves them);
- **kill under load**, **restart** and **burst** (once per round): four streams with a node
  SIGKILLed under them (all continued?) and four new requests sent meanwhile (lost?); a
  restarted node's time to get traffic back; the latency of 429s under a burst of 10x capacity
  (160 requests; 8 running and 8 queued fit).

The probe's settings are the shipped defaults unless ``--probe-interval-s`` / ``--connect-s``
say otherwise. The chaos tests in tests/system/test_resilience.py assert the behaviour; this
prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.config import (  # noqa: E402
    Admission,
    Breaker,
    ModelSpec,
    OrchestratorSettings,
    Settings,
    Timeouts,
    to_toml,
)
from tokenrelay.stack import Stack, StackPorts, TritonProcess  # noqa: E402
from tokenrelay.v1 import generation_pb2 as pb  # noqa: E402
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

COOLDOWN_S = 1.0
CHAT = {
    "model": "synthetic",
    "messages": [{"role": "user", "content": "tell me a long story"}],
    "max_tokens": 200,
    "seed": 11,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _stack(workdir: Path, probe_s: float, connect_s: float) -> Stack:
    settings = Settings(
        orchestrator=OrchestratorSettings(
            probe_interval_s=probe_s,
            timeouts=Timeouts(connect_s=connect_s),
            breaker=Breaker(cooldown_s=COOLDOWN_S),
            admission=Admission(max_concurrent=8, max_queue=8, queue_timeout_s=2.0),
        ),
        models=(ModelSpec("synthetic", "synthetic", context_window=4096, default_max_tokens=64),),
    )
    stack = Stack(REPO / "triton_models", StackPorts.free(), models=("synthetic",), nodes=2)
    config = workdir / "tokenrelay.toml"
    config.write_text(to_toml(settings))
    stack.config = config
    return stack.start()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _stream(
    stub: pb_grpc.GenerationServiceStub, tokens: int
) -> tuple[str, float, str, int, int]:
    """(node, time to first token, gRPC code name or "OK", tokens, continuations)."""
    request = pb.GenerateStreamRequest(
        model="synthetic", prompt="go", sampling=pb.SamplingParams(max_tokens=tokens)
    )
    began, node, first, used, continued = time.monotonic(), "", float("nan"), 0, 0
    try:
        async for message in stub.GenerateStream(request, timeout=30):
            if message.HasField("start"):
                node, first = message.start.served_by.node, time.monotonic() - began
            if message.HasField("end"):
                used, continued = message.end.usage.completion_tokens, message.end.continued.count
    except grpc.aio.AioRpcError as exc:
        return node, first, exc.code().name, used, continued
    return node, first, "OK", used, continued


def _serving(stack: Stack) -> TritonProcess:
    """The node with a request in flight (the one stream running), from the Status RPC."""
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        status = pb_grpc.GenerationServiceStub(channel).Status(pb.StatusRequest(), timeout=5)
    (busy,) = [n.address for n in status.nodes if n.in_flight]
    return next(n for n in stack.nodes if n.grpc == busy)


async def _restore(stack: Stack, stub: pb_grpc.GenerationServiceStub) -> None:
    """Every node running and serving again (a crashed or killed one restarted)."""
    for node in stack.nodes:
        node.resume()
    served: set[str] = set()
    while served != {n.grpc for n in stack.nodes}:
        for node in stack.nodes:
            if node.process is not None and node.process.poll() is not None:
                node.start()
        node_name, _, code, _, _ = await _stream(stub, 2)
        if code == "OK":
            served.add(node_name)
        await asyncio.sleep(0.05)


async def _chat(
    http: aiohttp.ClientSession, on_chunk: Callable[[int], None]
) -> tuple[str, str | None, list[str], list[float], dict[str, object]]:
    """One streamed chat completion read as SSE: (text, finish reason, error events, arrival
    times of content chunks, the usage chunk); ``on_chunk(n)`` after the n-th content chunk."""
    text, finish, errors, times, usage = "", None, [], [], {}
    event = "message"
    async with http.post("/v1/chat/completions", json=CHAT) as response:
        if response.status != 200:
            return "", None, [f"HTTP {response.status}"], [], {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if event == "error":
                errors.append(data)
            elif data != "[DONE]":
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        text += choice["delta"]["content"]
                        times.append(time.monotonic())
                        on_chunk(len(times))
                    finish = choice.get("finish_reason") or finish
    return text, finish, errors, times, usage


def _breaker(stack: Stack, fault: str) -> Callable[[int], None]:
    """An ``on_chunk`` that finds the serving node at the first chunk (so that nothing but the
    fault happens at the fifth) and breaks it after the fifth."""
    serving: list[TritonProcess] = []

    def on_chunk(n: int) -> None:
        if n == 1:
            serving.append(_serving(stack))
        if n == 5:
            node = serving[0]
            node.kill() if fault == "kill" else node.pause()

    return on_chunk


async def continuation(
    stack: Stack, stub: pb_grpc.GenerationServiceStub, runs: int, fault: str
) -> dict[str, float]:
    """``runs`` streams, each with its serving node broken (``fault``) after the fifth chunk."""
    failures, splices, others = 0, [], []
    async with aiohttp.ClientSession(stack.edge_url) as http:
        expected, *_ = await _chat(http, lambda _: None)
        for _ in range(runs):
            text, finish, errors, times, usage = await _chat(http, _breaker(stack, fault))
            await _restore(stack, stub)
            used = usage.get("completion_tokens", 0)
            assert isinstance(used, int)
            if errors or finish != "length" or text != expected or used < len(text.split()):
                failures += 1
            gaps = [b - a for a, b in itertools.pairwise(times)]
            if len(gaps) >= 5:
                splices.append(gaps[4])
                others.extend(gaps[:4] + gaps[5:])
    return {
        f"{fault}_runs": runs,
        f"{fault}_client_visible_failures": failures,
        f"{fault}_splice_gap_p50_ms": 1000 * _pct(splices, 0.5),
        f"{fault}_splice_gap_p99_ms": 1000 * _pct(splices, 0.99),
        f"{fault}_other_gaps_p50_ms": 1000 * _pct(others, 0.5),
    }


async def hung_waiters(
    stack: Stack, stub: pb_grpc.GenerationServiceStub, target_s: float
) -> dict[str, float]:
    hung = stack.nodes[1]
    hung.pause()
    began = time.monotonic()
    try:
        outcomes = await asyncio.gather(*(_stream(stub, 10) for _ in range(4)))
    finally:
        hung.resume()
    moved = [first for _, first, _, _, _ in outcomes if first > 0.2]
    await _restore(stack, stub)
    return {
        "hung_waiters_moved": len(moved),
        "hung_waiters_moved_max_s": max(moved, default=float("nan")),
        "hung_waiters_target_s": target_s,
        "hung_waiters_lost": sum(code != "OK" for _, _, code, _, _ in outcomes),
        "hung_waiters_paused_for_s": time.monotonic() - began,
    }


async def kill_under_load(stack: Stack, stub: pb_grpc.GenerationServiceStub) -> dict[str, float]:
    victim = stack.nodes[0]
    # Within the capacity of 8: continued streams keep their slots, the new requests need four.
    streams = [asyncio.create_task(_stream(stub, 150)) for _ in range(4)]
    await asyncio.sleep(0.5)
    victim.kill()
    fresh = await asyncio.gather(*(_stream(stub, 10) for _ in range(4)))
    outcomes = await asyncio.gather(*streams)
    on_victim = [o for o in outcomes if o[0] == victim.grpc]
    return {
        "kill_streams_on_victim": len(on_victim),
        "kill_streams_continued": sum(o[4] == 1 and o[2] == "OK" for o in on_victim),
        "kill_streams_failed": sum(o[2] != "OK" or o[3] != 150 for o in outcomes),
        "kill_new_requests_lost": sum(code != "OK" for _, _, code, _, _ in fresh),
    }


async def restart(stack: Stack, stub: pb_grpc.GenerationServiceStub) -> dict[str, float]:
    victim = stack.nodes[0]
    victim.start()
    back = time.monotonic()
    node = ""
    while node != victim.grpc:  # back-to-back one-token requests until one lands there
        node, _, _, _, _ = await _stream(stub, 1)
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


async def run(stack: Stack, args: argparse.Namespace) -> list[dict[str, float]]:
    target = args.probe_interval_s + args.connect_s + 0.25
    rows = []
    async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        figures = await continuation(stack, stub, args.runs, "kill")
        if args.stop_runs:
            figures |= await continuation(stack, stub, args.stop_runs, "stop")
        print("continuation: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
        rows.append(figures)
        for i in range(args.rounds):
            figures = await hung_waiters(stack, stub, target)
            figures |= await kill_under_load(stack, stub)
            figures |= await restart(stack, stub)
            await _restore(stack, stub)
            figures |= await burst(stack)
            print(f"round {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
            rows.append(figures)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="streams with a node SIGKILLed")
    parser.add_argument("--stop-runs", type=int, default=5, help="... with a node SIGSTOPped")
    parser.add_argument("--rounds", type=int, default=3)
    defaults = OrchestratorSettings()
    parser.add_argument("--probe-interval-s", type=float, default=defaults.probe_interval_s)
    parser.add_argument("--connect-s", type=float, default=defaults.timeouts.connect_s)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        stack = _stack(Path(workdir), args.probe_interval_s, args.connect_s)
        try:
            continued, *rounds = asyncio.run(run(stack, args))
        finally:
            stack.stop()
    print("\n| figure | value |\n|---|---|")
    for key, value in continued.items():
        print(f"| {key} | {value:.4g} |")
    if rounds:
        print("\n| figure | median | worst |\n|---|---|---|")
        for key in rounds[0]:
            values = [row[key] for row in rounds]
            worst = min(values) if key in ("burst_ok", "kill_streams_continued") else max(values)
            print(f"| {key} | {statistics.median(values):.4g} | {worst:.4g} |")


if __name__ == "__main__":
    main()
