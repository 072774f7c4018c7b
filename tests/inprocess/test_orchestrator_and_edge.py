"""Orchestrator (gRPC and frames on port 0) and edge (aiohttp test server, calling its generations
over either) in this process, fake sources."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import ClientSession, ClientTimeout
from aiohttp.test_utils import TestServer
from openai._streaming import SSEDecoder

from _support import FakeSource, assert_openai
from tokenrelay.config import EdgeSettings
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource(words=tuple(f" w{i}" for i in range(40)), interval_s=0.02)


@pytest.fixture
async def stub(orchestrator: Orchestrator) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.fixture(params=["grpc", "frames"])
async def edge(orchestrator: Orchestrator, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The edge calling the orchestrator's generations over gRPC, or over frames."""
    frames = f"127.0.0.1:{orchestrator.frames_port}" if request.param == "frames" else ""
    settings = EdgeSettings(
        orchestrator=f"127.0.0.1:{orchestrator.port}",
        orchestrator_frames=frames,
        keepalive_interval_s=0.05,
    )
    server = TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    yield str(server.make_url(""))
    await server.close()


async def test_unexpected_failure_is_internal_without_details(
    source: FakeSource, stub: pb_grpc.GenerationServiceStub
) -> None:
    source.fail_with = RuntimeError("secret internal detail at 10.1.2.3")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(model="synthetic", prompt="x"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "Internal error."


async def test_cancelled_grpc_call_cancels_the_source(
    source: FakeSource, stub: pb_grpc.GenerationServiceStub
) -> None:
    call = stub.GenerateStream(pb.GenerateStreamRequest(model="synthetic", prompt="x"))
    await call.read()
    call.cancel()
    await asyncio.wait_for(source.ended.wait(), 3)
    assert (source.cancelled, source.finished) == (1, 0)


async def test_edge_disconnect_cancels_the_source(source: FakeSource, edge: str) -> None:
    # A text completion's stream is not resumable: its client going away cancels it at once
    # (a chat completion's waits for its grace period: test_resume_and_websocket.py).
    source.words = tuple(f" w{i}" for i in range(400))
    body = {"model": "synthetic", "prompt": "hi", "stream": True}
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as session,
        session.post(f"{edge}/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        await response.content.readline()
        # leaving the block drops the connection mid-stream
    await asyncio.wait_for(source.ended.wait(), 3)
    assert (source.cancelled, source.finished) == (1, 0)


async def test_edge_keeps_idle_streams_alive_and_ends_with_done(
    source: FakeSource, edge: str
) -> None:
    source.words = (" slow", " answer")
    source.interval_s = 0.2  # longer than the keepalive interval
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        ClientSession() as session,
        session.post(f"{edge}/v1/chat/completions", json=body) as response,
    ):
        text = (await response.read()).decode()
    assert ": ping" in text
    # Read as the openai SDK reads it: its decoder makes an event of every blank line once an
    # event had an id (resumable streams' have), so a ping must not end with one.
    decoder = SSEDecoder()
    events = [e.data for e in map(decoder.decode, text.splitlines()) if e is not None]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert_openai("CreateChatCompletionStreamResponse", json.loads(event))


async def test_error_after_first_token_is_an_sse_error_event(source: FakeSource, edge: str) -> None:
    # The stall watchdog cannot fire here (30 s); a source failing mid-stream stands in for it.
    class FailingLater(FakeSource):
        async def generate(self, model, prompt, sampling, request_id, headers=()):  # type: ignore[no-untyped-def]
            async for delta in super().generate(model, prompt, sampling, request_id, headers):
                yield delta
                raise RuntimeError("boom")

    failing = FailingLater(name=source.name)
    source.generate = failing.generate  # type: ignore[method-assign]
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        ClientSession() as session,
        session.post(f"{edge}/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        text = (await response.read()).decode()
    assert "event: error" in text and "[DONE]" not in text
    error = json.loads(text.split("event: error\ndata: ")[1].split("\n")[0])
    assert_openai("ErrorResponse", error)
    assert error["error"]["message"] == "The model failed while generating."
    assert "boom" not in text


async def test_every_log_line_of_a_refused_request_carries_its_id(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    from tokenrelay.logs import _context

    seen: list[object] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(dict(_context.get()).get("request_id"))

    handler = Recorder()
    logger = logging.getLogger("tokenrelay")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(pb.GenerateRequest(model="nope", prompt="x", request_id="rid-7"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen and all(rid == "rid-7" for rid in seen)


@pytest.mark.parametrize("stream", [True, False])
async def test_the_edge_calls_over_one_frames_connection_one_request_after_another(
    source: FakeSource, orchestrator: Orchestrator, stream: bool
) -> None:
    # A connection serves a next call only once its call ended; the edge stops reading when
    # every answer has ended, and lets the call's end come instead of closing it (a new
    # connection per request cost both processes a connect and an accept).
    source.words, source.interval_s = (" a", " b"), 0.0
    settings = EdgeSettings(
        orchestrator=f"127.0.0.1:{orchestrator.port}",
        orchestrator_frames=f"127.0.0.1:{orchestrator.frames_port}",
    )
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    frames = orchestrator._frames
    assert frames is not None
    seen = set()
    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as session:
            for n in (1, 2, 1):
                body = {
                    "model": "synthetic",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream,
                    "n": n,
                }
                async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
                    assert r.status == 200
                    await r.read()
                for _ in range(100):  # the call's end may come a moment after the answer's
                    if len(frames._connections) == 1 and not frames._calls:
                        break
                    await asyncio.sleep(0.01)
                assert len(frames._connections) == 1
                seen.add(id(next(iter(frames._connections))))
    finally:
        await server.close()
    assert len(seen) == 1
