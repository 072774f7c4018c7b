"""Cancellation is a normal path: a flood of streams cancelled or expiring at random points leaves
nothing behind — no request counted in flight on a node, no slot held, no error in the logs — and
the service answers the next request as usual."""

from __future__ import annotations

import asyncio
import json
import random
import time

import grpc
import httpx
import pytest

from tokenrelay.stack import Stack
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.chaos

_CHAT = pb.Chat(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="go")])


def _log_sizes(stack: Stack) -> dict[str, int]:
    return {name: (stack.logs / f"{name}.log").stat().st_size for name in ("orchestrator", "edge")}


def _errors_since(stack: Stack, sizes: dict[str, int]) -> list[str]:
    found = []
    for name, offset in sizes.items():
        with (stack.logs / f"{name}.log").open("rb") as log:
            log.seek(offset)
            for line in log.read().decode(errors="replace").splitlines():
                try:
                    level = json.loads(line).get("level")
                except ValueError:
                    level = "unparsable"  # a traceback or stray print is as bad as an error
                if level not in ("debug", "info", "warning"):
                    found.append(f"{name}: {line[:3000]}")
    return found


async def _grpc_stream(stub: pb_grpc.GenerationServiceStub, rng: random.Random) -> None:
    deadline = rng.choice([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 0.6])
    stop_after = rng.randrange(0, 6)
    call = stub.GenerateStream(
        pb.GenerateStreamRequest(
            model="synthetic", chat=_CHAT, sampling=pb.SamplingParams(max_tokens=20)
        ),
        timeout=deadline,
    )
    try:
        received = 0
        async for _ in call:
            received += 1
            if received > stop_after:
                call.cancel()
                break
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), exc


async def _edge_stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {
        "model": "synthetic",
        "stream": True,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "go"}],
    }
    stop_after = rng.randrange(0, 400)
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, timeout=rng.choice([0.005, 0.05, 5.0])
        ) as response:
            seen = 0
            async for chunk in response.aiter_bytes():
                seen += len(chunk)
                if seen > stop_after:
                    break  # the connection closes with the stream: the client went away
    except httpx.TimeoutException:
        pass


async def _flood(stack: Stack) -> None:
    rng = random.Random(20)
    async with (
        grpc.aio.insecure_channel(stack.orchestrator_address) as channel,
        httpx.AsyncClient(base_url=stack.edge_url) as client,
    ):
        stub = pb_grpc.GenerationServiceStub(channel)
        calls = [_grpc_stream(stub, rng) for _ in range(300)]
        calls += [_edge_stream(client, rng) for _ in range(100)]
        rng.shuffle(calls)
        await asyncio.gather(*calls)


def _quiet(stack: Stack, timeout_s: float = 10.0) -> pb.StatusResponse:
    """The orchestrator's status once nothing runs any more (or when the time is up)."""
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            status = stub.Status(pb.StatusRequest(), timeout=5)
            idle = not status.running and not status.queued
            if (idle and not any(n.in_flight for n in status.nodes)) or (
                time.monotonic() > deadline
            ):
                return status  # type: ignore[no-any-return]
            time.sleep(0.05)


def test_a_flood_of_cancelled_and_expiring_streams_leaves_nothing_behind(stack: Stack) -> None:
    sizes = _log_sizes(stack)
    for _ in range(2):
        asyncio.run(_flood(stack))
    status = _quiet(stack)
    assert {n.address: n.in_flight for n in status.nodes} == {stack.triton_grpc: 0}
    assert (status.running, status.queued) == (0, 0)
    # Normal service: a whole answer, at once.
    answer = httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json={
            "model": "synthetic",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        },
        timeout=20,
    )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    assert _errors_since(stack, sizes) == []
