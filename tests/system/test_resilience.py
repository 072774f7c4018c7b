"""Chaos tests: two real Triton servers under the orchestrator and the edge, broken on purpose.

Nodes are SIGKILLed (gone without a word), SIGSTOPped (hung with their connections open) and
restarted; the synthetic model streams 50 tokens/s, so timings are the relay's, not a model's.
The tests that break a node of the module's shared pair put it back before they end.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import openai
import pytest

from _support import REPO, assert_openai, eventually, triton_metric
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
from tokenrelay.stack import Stack, StackPorts, TritonProcess
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.chaos

FIRST_TOKEN_S = 5.0  # longer than the probe takes to find a hung node, so moves are its work
COOLDOWN_S = 1.0
PROBE_INTERVAL_S = 0.2
CONNECT_S = 0.5
# A hung node's requests move within a probe interval and a probe's timeout (the figure is in
# benchmarks/resilience.py); asserted with a generous margin for this shared 2-core machine.
MOVED_WITHIN_S = PROBE_INTERVAL_S + CONNECT_S + 0.25
MARGIN_S = 1.0

SYNTHETIC = ModelSpec("synthetic", "synthetic", context_window=4096, default_max_tokens=64)
BASE = Settings(
    orchestrator=OrchestratorSettings(
        probe_interval_s=PROBE_INTERVAL_S,
        drain_grace_s=10.0,
        timeouts=Timeouts(connect_s=CONNECT_S, first_token_s=FIRST_TOKEN_S),
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
        fast_stop=True,
    )
    if models is not None:
        settings = replace(settings, models=models(*stack.triton_addresses))
    path = tmp_path / "tokenrelay.toml"
    path.write_text(to_toml(settings))
    stack.config = path
    return stack


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two nodes under one orchestrator and edge, shared by the tests of this module that break
    a node: each puts it back (``_restore``) before it ends."""
    with _stack(tmp_path_factory.mktemp("pair")) as running:
        yield running


def _request(
    max_tokens: int = 20, model: str = "synthetic", seed: int | None = None
) -> pb.GenerateStreamRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateStreamRequest(model=model, prompt="go", sampling=sampling)


class Outcome:
    """What one client saw of one stream."""

    def __init__(self) -> None:
        self.node = ""
        self.fallback = False
        self.first_token_s: float | None = None
        self.tokens = 0
        self.continued = 0
        self.trailer: str | None = None
        self.code: grpc.StatusCode | None = None
        self.ended_at = 0.0


async def _stream(
    stub: pb_grpc.GenerationServiceStub,
    request: pb.GenerateStreamRequest,
    started: asyncio.Event | None = None,
) -> Outcome:
    outcome = Outcome()
    began = time.monotonic()
    call = stub.GenerateStream(request, timeout=30)
    try:
        async for message in call:
            if message.HasField("start"):
                outcome.node = message.start.served_by.node
                outcome.fallback = message.start.served_by.fallback
                outcome.first_token_s = time.monotonic() - began
                if started is not None:
                    started.set()
            if message.HasField("end"):
                outcome.tokens = message.end.usage.completion_tokens
                outcome.continued = message.end.continued.count
        outcome.trailer = dict(await call.trailing_metadata() or ()).get("tokenrelay-continued")
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code()
    outcome.ended_at = time.monotonic()
    return outcome


def _status(stack: Stack) -> dict[str, str]:
    """Each node's breaker state, from the orchestrator's Status RPC."""
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        status = pb_grpc.GenerationServiceStub(channel).Status(pb.StatusRequest(), timeout=5)
    return {n.address: pb.BreakerState.Name(n.breaker) for n in status.nodes}


def _serving(stack: Stack) -> TritonProcess:
    """The node that has a request in flight (the test's one stream), from the Status RPC."""
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        status = pb_grpc.GenerationServiceStub(channel).Status(pb.StatusRequest(), timeout=5)
    (busy,) = [n.address for n in status.nodes if n.in_flight]
    (node,) = [n for n in stack.nodes if n.grpc == busy]
    return node


def _breaker_log(stack: Stack, node: str) -> list[str]:
    """The states ``node``'s breaker went through, from the orchestrator's JSON log."""
    lines = (stack.logs / "orchestrator.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [
        r["to"] for r in records if r.get("msg") == "circuit breaker changed" and r["node"] == node
    ]


def _revive(stack: Stack) -> None:
    """Restart every node that is not running: killed by the test, or crashed after SIGCONT
    (tritonserver 2.51's Python backend sometimes dies of SIGSEGV right after a SIGSTOP and a
    SIGCONT; the orchestrator sees that as one more node failure)."""
    for node in stack.nodes:
        if node.process is not None and node.process.poll() is not None:
            node.start()


async def _restore(stack: Stack) -> float:
    """Bring every node back (resume a paused one, restart a killed one) and send small requests
    until each has served one again (a half-open breaker closes with a trial request). Returns
    how long that took after the nodes were back."""
    for node in stack.nodes:
        node.resume()
    _revive(stack)
    back_at = time.monotonic()
    served: set[str] = set()
    async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while served != {n.grpc for n in stack.nodes}:
            assert time.monotonic() - back_at < COOLDOWN_S + 15, _status(stack)
            _revive(stack)
            outcome = await _stream(stub, _request(max_tokens=2))
            assert outcome.code is None
            served.add(outcome.node)
            await asyncio.sleep(0.05)
    assert set(_status(stack).values()) == {"BREAKER_STATE_CLOSED"}
    return time.monotonic() - back_at


@dataclass
class Seen:
    """What an OpenAI client saw of one streamed chat completion."""

    text: str = ""
    finish: str | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0
    errors: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # between content chunks
    continued: dict[str, Any] | None = None


CHAT = {
    "model": "synthetic",
    "messages": [{"role": "user", "content": "tell me a long story"}],
    "max_tokens": 200,
    "seed": 11,
    "stream": True,
    "stream_options": {"include_usage": True},
}

Client = Callable[[str, Callable[[int], None]], Awaitable[Seen]]


async def _with_sdk(edge: str, after: Callable[[int], None]) -> Seen:
    """The openai SDK streams ``CHAT``; ``after(n)`` runs after its n-th content chunk."""
    seen, last = Seen(), 0.0
    sdk = openai.AsyncOpenAI(base_url=f"{edge}/v1", api_key="unused", max_retries=0)
    async with sdk:
        body = {k: v for k, v in CHAT.items() if k not in ("model", "messages")}
        stream = await sdk.chat.completions.create(
            model="synthetic",
            messages=[{"role": "user", "content": "tell me a long story"}],
            **body,  # type: ignore[arg-type]
        )
        async for chunk in stream:
            if chunk.usage is not None:
                seen.usage = chunk.usage.model_dump()
            extra = chunk.model_extra or {}
            seen.continued = extra.get("continued", seen.continued)
            for choice in chunk.choices:
                if choice.delta.content:
                    now = time.monotonic()
                    if seen.chunks:
                        seen.gaps.append(now - last)
                    last = now
                    seen.text += choice.delta.content
                    seen.chunks += 1
                    after(seen.chunks)
                seen.finish = choice.finish_reason or seen.finish
    return seen


async def _with_sse(edge: str, after: Callable[[int], None]) -> Seen:
    """A raw SSE reader (httpx, line by line) streams ``CHAT``; ``after`` as for the SDK."""
    seen, last = Seen(), 0.0
    event = "message"
    async with (
        httpx.AsyncClient(base_url=edge, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if event == "error":
                seen.errors.append(data)
                continue
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert_openai("CreateChatCompletionStreamResponse", chunk)
            seen.usage = chunk.get("usage") or seen.usage
            seen.continued = chunk.get("continued", seen.continued)
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    now = time.monotonic()
                    if seen.chunks:
                        seen.gaps.append(now - last)
                    last = now
                    seen.text += content
                    seen.chunks += 1
                    after(seen.chunks)
                seen.finish = choice.get("finish_reason") or seen.finish
    return seen


CLIENTS: dict[str, Client] = {"openai-sdk": _with_sdk, "raw-sse": _with_sse}


async def _uninterrupted(stack: Stack) -> str:
    seen = await _with_sse(stack.edge_url, lambda _: None)
    assert seen.finish == "length" and not seen.errors and seen.continued is None
    return seen.text


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
async def test_a_node_killed_or_hung_mid_stream_is_continued_with_no_gap_and_no_error(
    pair: Stack, client: str, fault: str
) -> None:
    expected = await _uninterrupted(pair)
    broken: list[TritonProcess] = []

    def after(chunks: int) -> None:
        if chunks == 5:  # the serving node fails mid-stream
            node = _serving(pair)
            node.kill() if fault == "SIGKILL" else node.pause()
            broken.append(node)

    try:
        seen = await CLIENTS[client](pair.edge_url, after)
    finally:
        await _restore(pair)
    assert broken, "the stream ended before its fifth chunk"
    assert seen.text == expected  # one answer, spliced: the synthetic model decodes greedily
    assert seen.finish == "length" and not seen.errors
    assert seen.usage is not None and seen.usage["completion_tokens"] >= len(seen.text.split())
    assert seen.continued is not None and seen.continued["count"] == 1
    if fault == "SIGSTOP":  # found hung by the probe, not by the 30 s stall watchdog
        assert max(seen.gaps) < MOVED_WITHIN_S + MARGIN_S, max(seen.gaps)


async def test_sigkill_continues_every_stream_of_the_node_and_new_requests_go_elsewhere(
    pair: Stack,
) -> None:
    victim, survivor = pair.nodes
    try:
        async with grpc.aio.insecure_channel(pair.orchestrator_address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            starts = [asyncio.Event() for _ in range(8)]
            streams = [
                asyncio.create_task(_stream(stub, _request(max_tokens=150), started))
                for started in starts
            ]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 10)
            await asyncio.sleep(0.3)  # ~15 tokens each: the kill lands well inside the streams
            victim.kill()
            fresh = [asyncio.create_task(_stream(stub, _request())) for _ in range(10)]
            outcomes = await asyncio.wait_for(asyncio.gather(*streams), 15)
            for outcome in await asyncio.wait_for(asyncio.gather(*fresh), 15):
                assert outcome.code is None and outcome.node == survivor.grpc
                assert outcome.tokens == 20
    finally:
        await _restore(pair)
    on_victim = [o for o in outcomes if o.node == victim.grpc]
    assert len(on_victim) == 4  # routing spread the eight streams evenly
    for outcome in outcomes:
        assert outcome.code is None and outcome.tokens == 150
        continued = outcome.node == victim.grpc
        assert outcome.continued == int(continued)
        assert outcome.trailer == ("1" if continued else None)


async def test_a_hung_node_s_waiters_move_within_a_probe_and_it_comes_back_half_open(
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
    for outcome in outcomes:
        assert outcome.code is None and outcome.tokens == 20 and outcome.node == healthy.grpc
        assert outcome.first_token_s is not None
        assert outcome.first_token_s < MOVED_WITHIN_S + MARGIN_S  # not the 5 s watchdog
    moved = [o for o in outcomes if o.first_token_s is not None and o.first_token_s > 0.3]
    assert len(moved) == 2  # half of them went to the hung node first
    # Back from SIGCONT: probes see it ready, the cool-down passes, a trial request closes it.
    took = await _restore(pair)
    assert took < COOLDOWN_S + PROBE_INTERVAL_S + 5
    assert _breaker_log(pair, hung.grpc)[-3:] == ["open", "half_open", "closed"]


async def test_a_killed_node_restarted_gets_traffic_within_cooldown_and_a_probe(
    pair: Stack,
) -> None:
    victim, _ = pair.nodes
    victim.kill()
    try:
        deadline = time.monotonic() + 5
        while _status(pair)[victim.grpc] != "BREAKER_STATE_OPEN":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        took = await _restore(pair)
    assert took < COOLDOWN_S + PROBE_INTERVAL_S + 0.5 + 1.0  # + the first request's own time


async def test_a_silent_node_fires_the_first_token_watchdog_and_is_retried(
    tmp_path: Path,
) -> None:
    watchdog = replace(
        BASE,
        orchestrator=replace(
            BASE.orchestrator, timeouts=replace(BASE.orchestrator.timeouts, first_token_s=1.0)
        ),
    )
    with _stack(
        tmp_path,
        watchdog,
        node_repositories=(_slow_repository(tmp_path, 3000), REPO / "triton_models"),
    ) as stack:
        slow, fast = stack.nodes
        async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            outcomes = await asyncio.gather(*(_stream(stub, _request()) for _ in range(4)))
        retried = [o for o in outcomes if o.first_token_s is not None and o.first_token_s > 0.9]
        assert len(retried) == 2  # half of them went to the silent (alive, answering) node
        for outcome in outcomes:
            assert outcome.code is None and outcome.tokens == 20 and outcome.node == fast.grpc
        for outcome in retried:
            assert outcome.first_token_s is not None
            assert 1.0 <= outcome.first_token_s < 1.0 + 0.5  # a shared 2-core machine
        metric = "tokenrelay_model_requests_total"
        assert await eventually(
            lambda: triton_metric(slow.metrics_url, metric, outcome="cancelled") >= 2
        )


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
