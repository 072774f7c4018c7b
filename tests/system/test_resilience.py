"""Chaos tests: two real Triton servers under the orchestrator and the edge, broken on purpose.

Nodes are SIGKILLed (gone without a word), SIGSTOPped (hung with their connections open) and
restarted; the synthetic model streams 50 tokens/s, so timings are the relay's, not a model's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import pytest

from _support import REPO, assert_openai, triton_metric
from tokenrelay.config import (
    Admission,
    Breaker,
    ModelSpec,
    OrchestratorSettings,
    Routing,
    Settings,
    Timeouts,
    to_toml,
)
from tokenrelay.stack import Stack, StackPorts
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.chaos

FIRST_TOKEN_S = 1.0
COOLDOWN_S = 1.0
PROBE_INTERVAL_S = 0.2

SYNTHETIC = ModelSpec("synthetic", "synthetic", context_window=4096, default_max_tokens=64)
BASE = Settings(
    orchestrator=OrchestratorSettings(
        probe_interval_s=PROBE_INTERVAL_S,
        drain_grace_s=10.0,
        timeouts=Timeouts(connect_s=0.5, first_token_s=FIRST_TOKEN_S),
        breaker=Breaker(cooldown_s=COOLDOWN_S),
    ),
    models=(SYNTHETIC,),
)


def _stack(
    tmp_path: Path,
    settings: Settings = BASE,
    models: Callable[[str, str], tuple[ModelSpec, ...]] | None = None,
    node_repositories: tuple[Path, ...] = (),
) -> Stack:
    """A stack of two Triton nodes serving the synthetic model, configured with ``settings``;
    ``models`` makes the catalog from the two nodes' addresses, where it names them."""
    stack = Stack(
        REPO / "triton_models",
        StackPorts.free(),
        models=("synthetic",),
        nodes=2,
        node_repositories=node_repositories,
    )
    if models is not None:
        settings = replace(settings, models=models(*stack.triton_addresses))
    path = tmp_path / "tokenrelay.toml"
    path.write_text(to_toml(settings))
    stack.config = path
    return stack


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Stack]:
    with _stack(tmp_path) as running:
        yield running


def _request(max_tokens: int = 20, model: str = "synthetic") -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=model, prompt="go", sampling=pb.SamplingParams(max_tokens=max_tokens)
    )


class Outcome:
    """What one client saw of one stream."""

    def __init__(self) -> None:
        self.node = ""
        self.fallback = False
        self.first_token_s: float | None = None
        self.tokens = 0
        self.code: grpc.StatusCode | None = None
        self.ended_at = 0.0


async def _stream(
    stub: pb_grpc.GenerationServiceStub,
    request: pb.GenerateStreamRequest,
    started: asyncio.Event | None = None,
) -> Outcome:
    outcome = Outcome()
    began = time.monotonic()
    try:
        async for message in stub.GenerateStream(request, timeout=30):
            if message.HasField("start"):
                outcome.node = message.start.served_by.node
                outcome.fallback = message.start.served_by.fallback
                outcome.first_token_s = time.monotonic() - began
                if started is not None:
                    started.set()
            if message.HasField("end"):
                outcome.tokens = message.end.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code()
    outcome.ended_at = time.monotonic()
    return outcome


def _status(stack: Stack) -> dict[str, str]:
    """Each node's breaker state, from the orchestrator's Status RPC."""
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        status = pb_grpc.GenerationServiceStub(channel).Status(pb.StatusRequest(), timeout=5)
    return {n.address: pb.BreakerState.Name(n.breaker) for n in status.nodes}


def _breaker_log(stack: Stack, node: str) -> list[str]:
    """The states ``node``'s breaker went through, from the orchestrator's JSON log."""
    lines = (stack.logs / "orchestrator.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [
        r["to"] for r in records if r.get("msg") == "circuit breaker changed" and r["node"] == node
    ]


async def test_sigkill_mid_stream_ends_its_streams_fast_and_new_requests_go_elsewhere(
    pair: Stack,
) -> None:
    victim, survivor = pair.nodes
    async with grpc.aio.insecure_channel(pair.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        starts = [asyncio.Event() for _ in range(8)]
        streams = [
            asyncio.create_task(_stream(stub, _request(max_tokens=150), started))
            for started in starts
        ]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 10)
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        victim.kill()
        fresh = [asyncio.create_task(_stream(stub, _request())) for _ in range(10)]
        outcomes = await asyncio.wait_for(asyncio.gather(*streams), 15)
        for outcome in await asyncio.wait_for(asyncio.gather(*fresh), 15):
            assert outcome.code is None and outcome.node == survivor.grpc
            assert outcome.tokens == 20
    on_victim = [o for o in outcomes if o.node == victim.grpc]
    assert len(on_victim) == 4  # routing spread the eight streams evenly
    for outcome in on_victim:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE
        assert outcome.ended_at - killed_at < 1.0
    for outcome in outcomes:
        if outcome.node == survivor.grpc:
            assert outcome.code is None and outcome.tokens == 150


async def test_sigstop_fires_the_first_token_watchdog_and_retries_then_half_open_brings_it_back(
    pair: Stack,
) -> None:
    hung, healthy = pair.nodes
    hung.pause()
    try:
        async with grpc.aio.insecure_channel(pair.orchestrator_address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            outcomes = await asyncio.gather(*(_stream(stub, _request()) for _ in range(4)))
    finally:
        hung.resume()
    retried = [o for o in outcomes if o.first_token_s is not None and o.first_token_s > 0.9]
    assert len(retried) == 2  # half of them went to the hung node first
    for outcome in outcomes:
        assert outcome.code is None and outcome.tokens == 20 and outcome.node == healthy.grpc
    for outcome in retried:
        assert outcome.first_token_s is not None
        assert FIRST_TOKEN_S <= outcome.first_token_s < FIRST_TOKEN_S + 0.25
    # Back from SIGCONT: probes see it ready, the cool-down passes, a trial request closes it.
    deadline = time.monotonic() + COOLDOWN_S + PROBE_INTERVAL_S + 5
    served_by_hung = False
    async with grpc.aio.insecure_channel(pair.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while not served_by_hung:
            assert time.monotonic() < deadline, _status(pair)
            outcome = await _stream(stub, _request(max_tokens=2))
            assert outcome.code is None
            served_by_hung = outcome.node == hung.grpc
    assert _breaker_log(pair, hung.grpc)[-3:] == ["open", "half_open", "closed"]
    assert _status(pair)[hung.grpc] == "BREAKER_STATE_CLOSED"


async def test_a_killed_node_restarted_gets_traffic_within_cooldown_and_a_probe(
    pair: Stack,
) -> None:
    victim, _ = pair.nodes
    victim.kill()
    deadline = time.monotonic() + 5
    while _status(pair)[victim.grpc] != "BREAKER_STATE_OPEN":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    victim.start()
    back_at = time.monotonic()
    async with grpc.aio.insecure_channel(pair.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while True:
            outcome = await _stream(stub, _request(max_tokens=2))
            assert outcome.code is None
            if outcome.node == victim.grpc:
                break
            assert time.monotonic() - back_at < COOLDOWN_S + PROBE_INTERVAL_S + 0.5
    assert _status(pair)[victim.grpc] == "BREAKER_STATE_CLOSED"


def _fallback_models(a: str, b: str) -> tuple[ModelSpec, ...]:
    return (
        ModelSpec("synthetic", "synthetic", nodes=(a,), fallback="synthetic-backup"),
        ModelSpec("synthetic-backup", "synthetic", nodes=(b,)),
        ModelSpec("synthetic-solo", "synthetic", nodes=(a,)),
    )


async def test_every_node_of_a_model_down_means_its_fallback_answers_else_503(
    tmp_path: Path,
) -> None:
    with _stack(tmp_path, models=_fallback_models) as stack:
        primary, backup = stack.nodes
        primary.kill()
        body = {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
        }
        async with httpx.AsyncClient(base_url=stack.edge_url, timeout=10) as http:
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tokenrelay-fallback"] == "synthetic-backup"
            assert answer.json()["model"] == "synthetic-backup"
            assert_openai("CreateChatCompletionResponse", answer.json())
            async with http.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as streamed:
                assert streamed.status_code == 200
                assert streamed.headers["x-tokenrelay-fallback"] == "synthetic-backup"
                assert "[DONE]" in (await streamed.aread()).decode()
            for model in ("synthetic-solo",):
                began = time.monotonic()
                refused = await http.post("/v1/chat/completions", json={**body, "model": model})
                assert refused.status_code == 503 and time.monotonic() - began < 1.0
                assert_openai("ErrorResponse", refused.json())
            async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
                call = pb_grpc.GenerationServiceStub(channel).GenerateStream(_request(), timeout=10)
                first = await anext(aiter(call))
                assert first.start.served_by.fallback
                assert first.start.served_by.model == "synthetic-backup"
                assert ("tokenrelay-fallback", "synthetic-backup") in tuple(
                    await call.initial_metadata()
                )
                call.cancel()
            backup.kill()
            for model in ("synthetic", "synthetic-backup"):
                began = time.monotonic()
                refused = await http.post("/v1/chat/completions", json={**body, "model": model})
                assert refused.status_code == 503, refused.text
                assert time.monotonic() - began < 1.0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


ADMISSION = replace(
    BASE,
    orchestrator=replace(
        BASE.orchestrator,
        admission=Admission(max_concurrent=4, max_queue=4, queue_timeout_s=2.0, retry_after_s=1.0),
    ),
)


async def test_a_burst_of_ten_times_capacity_gets_fast_429s_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    with _stack(tmp_path, ADMISSION) as stack:
        assert stack.orchestrator is not None
        body = {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10,
        }

        # aiohttp: at this concurrency httpx's connection pool is slower than the edge.
        async def one(http: aiohttp.ClientSession) -> tuple[int, float, dict[str, Any], str]:
            began = time.monotonic()
            async with http.post("/v1/chat/completions", json=body) as response:
                answer = await response.json()
            took = time.monotonic() - began
            return response.status, took, answer, response.headers.get("Retry-After", "")

        async def burst(size: int) -> list[tuple[int, float, dict[str, Any], str]]:
            connector = aiohttp.TCPConnector(limit=400)
            async with aiohttp.ClientSession(stack.edge_url, connector=connector) as http:
                return await asyncio.gather(*(one(http) for _ in range(size)))

        await burst(80)  # warm-up: the first burst allocates what every burst will reuse
        rss_before = _rss_kib(stack.orchestrator.pid)
        for _ in range(3):
            results = await burst(80)
            statuses = [status for status, _, _, _ in results]
            assert set(statuses) <= {200, 429}
            refused = sorted(took for status, took, _, _ in results if status == 429)
            assert len(refused) >= 40, statuses  # 8 fit at once: running plus queued
            assert refused[int(len(refused) * 0.99) - 1] < 1.0  # 429s come back quickly
            for status, _, answer, retry_after in results:
                if status == 200:
                    assert answer["usage"]["completion_tokens"] == 10
                else:
                    assert int(retry_after) >= 1
                    assert_openai("ErrorResponse", answer)
                    assert answer["error"]["type"] == "rate_limit_error"
        # A harder burst straight at the gRPC port: refused there without growing memory.
        async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            outcomes = await asyncio.gather(*(_stream(stub, _request(10)) for _ in range(400)))
        codes = {o.code for o in outcomes}
        assert codes <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert sum(o.code is None for o in outcomes) >= 8
        grown_mib = (_rss_kib(stack.orchestrator.pid) - rss_before) / 1024
        assert grown_mib < 30, f"orchestrator RSS grew {grown_mib:.1f} MiB"
        (ok,) = await burst(1)
        assert ok[0] == 200  # and it still serves


def _slow_repository(tmp_path: Path, first_token_delay_ms: int) -> Path:
    repository = tmp_path / "slow_models"
    shutil.copytree(REPO / "triton_models" / "synthetic", repository / "synthetic")
    config = repository / "synthetic" / "config.pbtxt"
    text = config.read_text()
    old = '{ key: "first_token_delay_ms", value: { string_value: "0" } }'
    assert old in text
    new = f'{{ key: "first_token_delay_ms", value: {{ string_value: "{first_token_delay_ms}" }} }}'
    config.write_text(text.replace(old, new))
    return repository


async def test_hedging_serves_from_the_fast_node_and_cancels_the_slow_one(tmp_path: Path) -> None:
    hedging = replace(
        BASE,
        orchestrator=replace(
            BASE.orchestrator,
            timeouts=replace(BASE.orchestrator.timeouts, first_token_s=10.0),
            routing=Routing(hedge_after_s=0.3),
        ),
    )
    with _stack(
        tmp_path,
        hedging,
        node_repositories=(_slow_repository(tmp_path, 3000), REPO / "triton_models"),
    ) as stack:
        slow, fast = stack.nodes
        async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            outcomes = await asyncio.gather(*(_stream(stub, _request()) for _ in range(4)))
        for outcome in outcomes:
            assert outcome.code is None and outcome.node == fast.grpc and outcome.tokens == 20
            assert outcome.first_token_s is not None and outcome.first_token_s < 1.0
        hedged = [o for o in outcomes if o.first_token_s is not None and o.first_token_s > 0.25]
        assert len(hedged) == 2
        deadline = time.monotonic() + 5
        metric = "tokenrelay_model_requests_total"
        while triton_metric(slow.metrics_url, metric, outcome="cancelled") < 2:
            assert time.monotonic() < deadline, "the slow node never saw its requests cancelled"
            await asyncio.sleep(0.1)
        assert triton_metric(slow.metrics_url, metric, outcome="completed") == 0
        assert _status(stack)[slow.grpc] == "BREAKER_STATE_CLOSED"
