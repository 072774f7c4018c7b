"""Metrics after a known sequence of requests: exact counters, histogram observation counts,
usage of interrupted streams, and request ids on log lines."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from _support import FakeSource, eventually
from tokenrelay.config import EdgeSettings
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource()


async def _samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_counters_and_histograms_after_completed_cancelled_and_refused(
    source: FakeSource, orchestrator: Orchestrator
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(2):  # completed: "Hello world!" is 3 tokens
            await stub.Generate(pb.GenerateRequest(model="synthetic", prompt="say it"))
        source.interval_s = 0.3  # the cancelled one: its second token comes after the cancel
        call = stub.GenerateStream(pb.GenerateStreamRequest(model="synthetic", prompt="go"))
        await call.read()
        call.cancel()
        await asyncio.wait_for(source.ended.wait(), 3)
        for request in (
            pb.GenerateRequest(model="nope", prompt="x"),
            pb.GenerateRequest(model="synthetic", prompt="x", sampling={"max_tokens": 0}),
        ):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(request)
    url = f"http://127.0.0.1:{orchestrator.metrics_port}/metrics"
    requests = "tokenrelay_requests_total"

    async def cancelled_recorded() -> bool:  # written as the cancelled call's stream closes
        samples = await _samples(url)
        return _value(samples, requests, model="synthetic", outcome="cancelled") == 1

    assert await eventually(cancelled_recorded)
    samples = await _samples(url)
    assert _value(samples, requests, model="synthetic", outcome="stop") == 2
    assert _value(samples, requests, model="synthetic", outcome="cancelled") == 1
    assert _value(samples, requests, model="unknown", outcome="not_found") == 1
    assert _value(samples, requests, model="synthetic", outcome="invalid") == 1
    assert _value(samples, "tokenrelay_completion_tokens_total", model="synthetic") == 7
    assert _value(samples, "tokenrelay_prompt_tokens_total", model="synthetic") == 2 + 2 + 1
    ttft = "tokenrelay_time_to_first_token_seconds_count"
    assert _value(samples, ttft, model="synthetic") == 3
    gaps = "tokenrelay_inter_token_latency_seconds_count"
    assert _value(samples, gaps, model="synthetic") == 4  # 2 gaps in each completed answer
    duration = "tokenrelay_request_duration_seconds_count"
    assert _value(samples, duration, model="synthetic") == 4
    assert _value(samples, duration, model="unknown") == 1
    assert _value(samples, "tokenrelay_requests_running") == 0
    assert _value(samples, "tokenrelay_node_breaker_state", node="fake:1") == 0


async def test_interrupted_stream_reports_its_usage_before_the_error_event(
    source: FakeSource, orchestrator: Orchestrator
) -> None:
    class FailingLater(FakeSource):
        async def generate(self, model, prompt, sampling, request_id, headers=()):  # type: ignore[no-untyped-def]
            async for delta in super().generate(model, prompt, sampling, request_id, headers):
                yield delta
                if delta.text == " world":
                    raise RuntimeError("the node died")

    failing = FailingLater(name=source.name)
    source.generate = failing.generate  # type: ignore[method-assign]
    app = create_app(EdgeSettings(orchestrator=f"127.0.0.1:{orchestrator.port}"))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        body = {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with ClientSession() as session:
            async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
                text = (await r.read()).decode()
            samples = await _samples(str(server.make_url("/metrics")))
    finally:
        await server.close()
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    usage = json.loads(data[-2])["usage"]  # the usage chunk, then the error event's data
    assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] == 3
    assert "event: error" in text and "[DONE]" not in text
    route = "/v1/chat/completions"
    assert _value(samples, "tokenrelay_edge_requests_total", route=route, status="200") == 1
    assert _value(samples, "tokenrelay_edge_request_duration_seconds_count", route=route) == 1
    assert _value(samples, "tokenrelay_edge_streams_open") == 0


async def _lag_samples(url: str, at_least: int) -> bool:
    """Whether the loop-lag histogram at ``url`` holds ``at_least`` samples."""
    return _value(await _samples(url), "tokenrelay_event_loop_lag_seconds_count") >= at_least


async def test_event_loop_lag_shows_a_blocked_loop(orchestrator: Orchestrator) -> None:
    url = f"http://127.0.0.1:{orchestrator.metrics_port}/metrics"
    name = "tokenrelay_event_loop_lag_seconds_bucket"
    assert await eventually(lambda: _lag_samples(url, 2))  # a few samples of an idle loop
    before = await _samples(url)
    assert _value(before, name, le="0.25") == _value(before, name, le="+Inf")  # all short
    time.sleep(0.3)  # noqa: ASYNC251 - the point: a blocking call on the loop

    async def slow_samples() -> float:
        after = await _samples(url)
        return _value(after, name, le="+Inf") - _value(after, name, le="0.25")

    assert await eventually(slow_samples)  # recorded once the loop runs again...
    assert await slow_samples() == 1  # ... the one sample that spanned the block


async def test_the_edge_reports_its_event_loop_lag(orchestrator: Orchestrator) -> None:
    server = TestServer(create_app(EdgeSettings(orchestrator=f"127.0.0.1:{orchestrator.port}")))
    await server.start_server()
    try:
        assert await eventually(lambda: _lag_samples(str(server.make_url("/metrics")), 2))
    finally:
        await server.close()
