"""The orchestrator's relay with fake token sources: routing, watchdogs, usage, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from _support import FakeSource, unavailable
from tokenrelay.config import OrchestratorSettings, Settings, Timeouts
from tokenrelay.errors import ModelNotFound, UpstreamTimeout, UpstreamUnavailable
from tokenrelay.generation import ChatMessage, FinishReason, GenerationRequest, Sampling
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._relay import Chunk, Relay


def _relay(*sources: FakeSource, timeouts: Timeouts | None = None) -> tuple[Relay, NodePool]:
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=tuple(s.name for s in sources), timeouts=timeouts or Timeouts()
        )
    )
    placement = {m.triton_model: settings.nodes_for(m) for m in settings.models}
    pool = NodePool({s.name: s for s in sources}, placement)
    return Relay(settings, pool), pool


def _request(**sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model="synthetic",
        messages=(ChatMessage("user", "say hello"),),
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
    )


async def _collect(relay: Relay, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in relay.stream(request)]


async def test_stream_has_start_first_end_last_and_counts_usage() -> None:
    source = FakeSource()
    relay, pool = _relay(source)
    await pool.probe_once()
    chunks = await _collect(relay, _request())
    assert "".join(c.text for c in chunks) == "Hello world!"
    assert chunks[0].start is not None and chunks[0].start.node == "fake:1"
    assert all(c.start is None for c in chunks[1:]) and all(c.end is None for c in chunks[:-1])
    end = chunks[-1].end
    assert end is not None and end.finish_reason is FinishReason.STOP
    assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (
        len(source.prompts[0].split()),
        3,
    )
    assert source.prompts[0].endswith("<|im_start|>assistant\n")  # the chat template applied
    assert source.samplings[0].max_tokens == 64  # the catalog's default


async def test_unknown_model_and_no_ready_node() -> None:
    relay, pool = _relay(FakeSource(ready=False))
    await pool.probe_once()
    with pytest.raises(ModelNotFound):
        await _collect(relay, dataclasses.replace(_request(), model="nope"))
    with pytest.raises(UpstreamUnavailable):
        await _collect(relay, _request())


async def test_routes_to_the_least_busy_ready_node_and_drops_a_failed_one() -> None:
    slow = FakeSource("a:1", interval_s=0.2)
    fast = FakeSource("b:1")
    relay, pool = _relay(slow, fast)
    await pool.probe_once()
    first = asyncio.create_task(_collect(relay, _request()))
    await asyncio.sleep(0.05)  # the first request is in flight on a:1
    second = await _collect(relay, _request())
    assert second[0].start is not None and second[0].start.node == "b:1"
    await first
    slow.is_ready = False
    await pool.probe_once()
    fast.fail_with = unavailable()
    with pytest.raises(UpstreamUnavailable):
        await _collect(relay, _request())
    assert pool.pick("synthetic") is None  # b:1 is out of rotation until a probe finds it ready
    await pool.probe_once()
    assert pool.pick("synthetic") is fast


async def test_first_token_watchdog_cancels_the_source() -> None:
    source = FakeSource(first_delay_s=5)
    relay, pool = _relay(source, timeouts=Timeouts(first_token_s=0.1))
    await pool.probe_once()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UpstreamTimeout, match="no first token"):
        await _collect(relay, _request())
    assert loop.time() - began < 1.0
    assert source.cancelled == 1


async def test_stall_watchdog_and_caller_budget() -> None:
    stalling = FakeSource(interval_s=5)
    relay, pool = _relay(stalling, timeouts=Timeouts(between_tokens_s=0.1))
    await pool.probe_once()
    with pytest.raises(UpstreamTimeout, match="no token for"):
        await _collect(relay, _request())
    relay, pool = _relay(FakeSource(interval_s=0.5))
    await pool.probe_once()
    with pytest.raises(UpstreamTimeout, match="deadline"):
        async for _ in relay.stream(_request(), time_budget_s=0.2):
            pass


async def test_closing_the_stream_cancels_the_source() -> None:
    source = FakeSource(interval_s=0.05, words=tuple(f" w{i}" for i in range(50)))
    relay, pool = _relay(source)
    await pool.probe_once()
    stream = relay.stream(_request())
    await anext(stream)
    await stream.aclose()
    assert source.cancelled == 1 and source.finished == 0
