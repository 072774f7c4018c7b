"""The orchestrator's relay with fake token sources: routing, watchdogs, usage, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging

import pytest

from _support import FakeSource, Ordered, eventually, relay_for, unavailable
from tokenrelay.config import (
    Admission,
    ModelSpec,
    OrchestratorSettings,
    Routing,
    Settings,
    Timeouts,
)
from tokenrelay.errors import (
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerationRequest,
    Role,
    Sampling,
)
from tokenrelay.orchestrator._pool import BreakerState, NodePool, Placement
from tokenrelay.orchestrator._relay import Relay


def _relay(
    *sources: FakeSource, timeouts: Timeouts | None = None, **orchestrator: object
) -> tuple[Relay, NodePool]:
    """A relay over ``sources``; ties in routing go to the first source listed."""
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=tuple(s.name for s in sources),
            timeouts=timeouts or Timeouts(),
            **orchestrator,  # type: ignore[arg-type]
        )
    )
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models}
    pool = NodePool({s.name: s for s in sources}, placement, rng=Ordered())
    return relay_for(settings, pool), pool


def _request(**sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model="synthetic",
        messages=(ChatMessage(Role.USER, "say hello"),),
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
    assert await eventually(lambda: pool.in_flight("a:1") == 1)  # the first request is on a:1
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
    lease = pool.pick("synthetic")
    assert lease is not None and lease.source is fast


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


async def test_a_caller_that_keeps_up_gets_each_delta_as_it_comes() -> None:
    words = tuple(f" w{i}" for i in range(6))
    relay, pool = _relay(FakeSource(words=words, interval_s=0.02))
    await pool.probe_once()
    chunks = await _collect(relay, _request())
    assert [c.text for c in chunks] == list(words)


async def test_deltas_that_arrive_while_the_caller_is_busy_go_out_as_one_chunk() -> None:
    words = tuple(f" w{i}" for i in range(10))
    relay, pool = _relay(FakeSource(words=words))
    await pool.probe_once()
    stream = relay.stream(_request())
    first, second = await anext(stream), await anext(stream)
    assert first.text == " w0" and first.start is not None  # never held back for company
    assert second.text == " w1"
    await asyncio.sleep(0.05)  # slower over a chunk than the model over a token: falls behind
    assert (await anext(stream)).text == " w2"  # still nothing waits for company
    await asyncio.sleep(0.05)  # the rest of the answer arrives meanwhile
    rest = [chunk async for chunk in stream]
    assert [c.text for c in rest] == ["".join(words[3:])]
    end = rest[0].end
    assert end is not None and end.finish_reason is FinishReason.STOP
    assert end.usage.completion_tokens == 10


async def test_a_failure_reaches_a_lagging_caller_after_the_text_before_it() -> None:
    class FailingLater(FakeSource):
        async def generate(self, model, prompt, sampling, request_id, headers=()):  # type: ignore[no-untyped-def]
            async for delta in super().generate(model, prompt, sampling, request_id, headers):
                yield delta
                if delta.text == " w5":
                    raise unavailable()

    words = tuple(f" w{i}" for i in range(10))
    relay, pool = _relay(FailingLater(words=words))
    await pool.probe_once()
    stream = relay.stream(_request())
    await anext(stream), await anext(stream)
    await asyncio.sleep(0.05)  # falls behind: the relay reads ahead from here on
    await anext(stream)
    await asyncio.sleep(0.05)  # still slow: the rest, and the failure, arrive meanwhile
    received = []
    with pytest.raises(UpstreamUnavailable) as failure:
        async for chunk in stream:
            received.append(chunk.text)
    assert received == [" w3 w4 w5"]
    assert failure.value.usage is not None and failure.value.usage.completion_tokens == 6


async def test_a_node_failing_before_the_first_token_is_retried_on_another() -> None:
    down, up = FakeSource("a:1", fail_with=unavailable()), FakeSource("b:1")
    relay, pool = _relay(down, up)
    await pool.probe_once()
    chunks = await _collect(relay, _request())
    assert "".join(c.text for c in chunks) == "Hello world!"
    assert chunks[0].start is not None and chunks[0].start.node == "b:1"
    assert len(down.prompts) == 1  # tried first, then taken out of rotation
    lease = pool.pick("synthetic")
    assert lease is not None and lease.node == "b:1"


async def test_first_token_watchdog_retries_elsewhere_within_the_deadline() -> None:
    stalled, healthy = FakeSource("a:1", first_delay_s=5), FakeSource("b:1")
    relay, pool = _relay(stalled, healthy, timeouts=Timeouts(first_token_s=0.2))
    await pool.probe_once()
    loop = asyncio.get_running_loop()
    began = loop.time()
    chunks = await _collect(relay, _request())
    assert 0.2 <= loop.time() - began < 0.5
    assert chunks[0].start is not None and chunks[0].start.node == "b:1"
    assert stalled.cancelled == 1  # the silent request was cancelled at its node
    # No retry left, or no deadline left: the caller gets the timeout.
    relay, pool = _relay(
        stalled, healthy, timeouts=Timeouts(first_token_s=0.2), routing=Routing(max_retries=0)
    )
    await pool.probe_once()
    with pytest.raises(UpstreamTimeout, match=r"no first token within 0\.2 s"):
        await _collect(relay, _request())


async def test_no_retry_once_a_token_went_out() -> None:
    breaking = FakeSource("a:1", interval_s=0.05)
    relay, pool = _relay(breaking, FakeSource("b:1"))
    await pool.probe_once()
    received = []
    with pytest.raises(UpstreamTimeout):
        async for chunk in relay.stream(_request(), time_budget_s=0.08):
            received.append(chunk)
    assert [c.text for c in received] == ["Hello", " world"]  # then the budget ran out
    assert received[0].start is not None and received[0].start.node == "a:1"


async def test_fallback_model_answers_when_no_node_of_the_primary_can() -> None:
    primary, backup = FakeSource("a:1", ready=False), FakeSource("b:1")
    models = (
        ModelSpec("big", "big", nodes=("a:1",), fallback="small"),
        ModelSpec("small", "small", nodes=("b:1",), context_window=64, default_max_tokens=16),
        ModelSpec("alone", "big", nodes=("a:1",)),
    )
    settings = Settings(orchestrator=OrchestratorSettings(triton=("a:1",)), models=models)
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in models}
    pool = NodePool({"a:1": primary, "b:1": backup}, placement)
    relay = relay_for(settings, pool)
    await pool.probe_once()
    chunks = await _collect(relay, dataclasses.replace(_request(), model="big"))
    start = chunks[0].start
    assert start is not None and (start.model, start.node, start.fallback) == ("small", "b:1", True)
    with pytest.raises(UpstreamUnavailable, match="'alone'"):
        await _collect(relay, dataclasses.replace(_request(), model="alone"))
    # A request that does not fit the fallback is not sent there.
    too_long = dataclasses.replace(_request(max_tokens=100), model="big")
    with pytest.raises(UpstreamUnavailable):
        await _collect(relay, too_long)


async def test_hedging_keeps_the_first_answer_and_cancels_the_other() -> None:
    slow, fast = FakeSource("a:1", first_delay_s=5), FakeSource("b:1")
    relay, pool = _relay(slow, fast, routing=Routing(hedge_after_s=0.1))
    await pool.probe_once()
    loop = asyncio.get_running_loop()
    began = loop.time()
    chunks = await _collect(relay, _request())
    assert loop.time() - began < 0.5
    assert chunks[0].start is not None and chunks[0].start.node == "b:1"
    assert slow.cancelled == 1 and pool.in_flight("a:1") == 0
    assert pool.breaker("a:1").state is BreakerState.CLOSED  # losing a race is no failure


async def test_a_caller_gone_while_the_hedge_loser_stops_stops_the_winner_too() -> None:
    class CancelsTheCaller(FakeSource):
        """A loser whose stream, as it is cancelled, sees its caller go (the same loop turn)."""

        caller: asyncio.Task[object] | None = None

        async def generate(self, model, prompt, sampling, request_id, headers=()):  # type: ignore[no-untyped-def]
            try:
                await asyncio.sleep(5)
                yield  # never
            finally:
                assert self.caller is not None
                self.caller.cancel()

    slow = CancelsTheCaller("a:1")
    fast = FakeSource("b:1", first_delay_s=0.2, words=tuple(f" w{i}" for i in range(40)))
    relay, pool = _relay(slow, fast, routing=Routing(hedge_after_s=0.1))
    await pool.probe_once()
    slow.caller = caller = asyncio.create_task(_collect(relay, _request()))
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await eventually(lambda: fast.cancelled == 1)  # the winner's stream, cancelled
    assert pool.in_flight("a:1") == pool.in_flight("b:1") == 0
    assert relay.admission.running == 0


async def test_admission_queue_then_refusal_with_retry_after() -> None:
    source = FakeSource(interval_s=0.1)
    admission = Admission(max_concurrent=1, max_queue=1, queue_timeout_s=5, retry_after_s=2)
    relay, pool = _relay(source, admission=admission)
    await pool.probe_once()
    running = asyncio.create_task(_collect(relay, _request()))
    assert await eventually(lambda: relay.admission.running == 1)
    queued = asyncio.create_task(_collect(relay, _request()))
    assert await eventually(lambda: relay.admission.queued == 1)
    assert (relay.admission.running, relay.admission.queued) == (1, 1)
    with pytest.raises(Overloaded) as refused:
        await _collect(relay, _request())
    assert refused.value.retry_after == 2
    assert len(await running) == len(await queued) == 3  # the queued one ran after the first
    assert (relay.admission.running, relay.admission.queued) == (0, 0)


async def test_admission_wait_is_bounded_and_a_gone_waiter_frees_its_place() -> None:
    source = FakeSource(interval_s=0.3)
    admission = Admission(max_concurrent=1, max_queue=2, queue_timeout_s=0.1)
    relay, pool = _relay(source, admission=admission)
    await pool.probe_once()
    running = asyncio.create_task(_collect(relay, _request()))
    assert await eventually(lambda: relay.admission.running == 1)
    with pytest.raises(Overloaded, match="in time"):
        await _collect(relay, _request())
    leaving = asyncio.create_task(_collect(relay, _request()))
    assert await eventually(lambda: relay.admission.queued == 1)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert relay.admission.queued == 0
    await running
    assert relay.admission.running == 0


async def test_a_request_the_model_refuses_is_a_400_and_never_blames_the_node() -> None:
    from tokenrelay.orchestrator._triton import _classify

    # As Triton's vLLM backend reports it: an error with no status code.
    refusal = _classify(None, "sampling parameter 'top_p' is out of range: 0.0", "a:1")
    assert isinstance(refusal, InvalidRequest) and "top_p" not in refusal.message
    source = FakeSource("a:1", fail_with=refusal)
    relay, pool = _relay(source, FakeSource("b:1"))
    await pool.probe_once()
    for _ in range(5):
        with pytest.raises(InvalidRequest):
            await _collect(relay, _request())
    assert len(source.prompts) == 5  # no retry elsewhere: the request is at fault
    assert pool.breaker("a:1").state is BreakerState.CLOSED


async def test_the_log_line_of_a_closed_stream_says_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = FakeSource(interval_s=0.05, words=tuple(f" w{i}" for i in range(50)))
    relay, pool = _relay(source)
    await pool.probe_once()
    with caplog.at_level(logging.INFO, logger="tokenrelay.orchestrator._relay"):
        stream = relay.stream(_request())
        await anext(stream)
        await stream.aclose()
    ended = [r for r in caplog.records if r.getMessage() == "generation ended"]
    assert [r.fields["outcome"] for r in ended] == ["cancelled"]  # type: ignore[attr-defined]


def _words(n: int) -> tuple[str, ...]:
    return tuple(f" w{i}" for i in range(n))


async def test_a_stream_interval_merges_close_tokens_and_never_holds_the_first() -> None:
    # 40 tokens 2 ms apart, a 30 ms interval: the first chunk is the first token alone; the
    # rest ride in chunks at most one per interval, and nothing is lost or reordered.
    source = FakeSource(words=_words(40), interval_s=0.002)
    relay, pool = _relay(source)
    await pool.probe_once()
    loop = asyncio.get_running_loop()
    began = loop.time()
    times, chunks = [], []
    async for chunk in relay.stream(dataclasses.replace(_request(), stream_interval_ms=30)):
        times.append(loop.time() - began)
        chunks.append(chunk)
    assert chunks[0].text == " w0" and chunks[0].start is not None
    assert "".join(c.text for c in chunks) == "".join(_words(40))
    assert chunks[-1].end is not None and chunks[-1].end.usage.completion_tokens == 40
    # At most one chunk per interval besides the first and the end, however slow the machine.
    assert len(chunks) <= times[-1] / 0.03 + 2 and len(chunks) < 40, times
    # At most one chunk per interval (the end goes out at once, so it is left out).
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
    assert all(gap >= 0.025 for gap in gaps), gaps


async def test_tokens_further_apart_than_the_interval_are_not_delayed() -> None:
    source = FakeSource(words=_words(5), interval_s=0.03)
    relay, pool = _relay(source)
    await pool.probe_once()
    chunks = await _collect(relay, dataclasses.replace(_request(), stream_interval_ms=5))
    assert [c.text for c in chunks] == list(_words(5))  # one chunk per token, as they came


async def test_the_stream_interval_comes_from_the_catalog_and_is_bounded_there() -> None:
    source = FakeSource(words=_words(30), interval_s=0.002)
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,)),
        models=(
            ModelSpec(
                id="synthetic",
                triton_model="synthetic",
                stream_interval_ms=20,
                max_stream_interval_ms=50,
            ),
        ),
    )
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models}
    pool = NodePool({source.name: source}, placement, rng=Ordered())
    relay = relay_for(settings, pool)
    await pool.probe_once()
    merged = await _collect(relay, _request())
    assert 2 < len(merged) < 15 and "".join(c.text for c in merged) == "".join(_words(30))
    each = await _collect(relay, dataclasses.replace(_request(), stream_interval_ms=0))
    assert len(each) == 30  # a request may turn it off
    # The node is told the interval in force (its model may merge by it too), or none.
    assert [s.stream_interval_ms for s in source.samplings] == [20, 0]
    with pytest.raises(InvalidRequest, match="between 0 and 50") as refused:
        await _collect(relay, dataclasses.replace(_request(), stream_interval_ms=51))
    assert refused.value.param == "stream_interval_ms"
    assert len(source.prompts) == 2  # refused before anything reached the node


async def test_a_caller_that_leaves_after_the_last_chunk_had_a_whole_answer() -> None:
    source = FakeSource()
    relay, pool = _relay(source)
    await pool.probe_once()
    stream = relay.stream(_request())
    async for chunk in stream:
        if chunk.end is not None:
            break  # the edge closes the call as soon as it holds the end
    await stream.aclose()
    samples = {
        s.labels["outcome"]: s.value
        for metric in relay.metrics.requests.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert samples == {"stop": 1.0}
