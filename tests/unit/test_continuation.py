"""Streams that outlive their node (``orchestrator/_continue.py``) and hung nodes noticed by the
probe (``_pool.Lease.lost``, ``_attempt.Attempt.watch``), with fake token sources."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from _support import ContinuingSource, Ordered, RecordingLedger, eventually, relay_for
from tokenrelay.config import (
    Continuation,
    ModelSpec,
    OrchestratorSettings,
    Settings,
    Timeouts,
)
from tokenrelay.errors import UpstreamTimeout, UpstreamUnavailable
from tokenrelay.generation import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerationRequest,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Sampling,
    Tool,
)
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Planner
from tokenrelay.orchestrator._pool import NodePool, Placement
from tokenrelay.orchestrator._relay import Relay

WORDS = tuple(f" w{i}" for i in range(12))
WHOLE = "".join(WORDS)


def _relay(
    *sources: ContinuingSource,
    timeouts: Timeouts | None = None,
    models: tuple[ModelSpec, ...] | None = None,
    **orchestrator: object,
) -> tuple[Relay, NodePool, RelayMetrics]:
    """A relay over ``sources``; ties in routing go to the first source listed."""
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=tuple(s.name for s in sources),
            timeouts=timeouts or Timeouts(),
            **orchestrator,  # type: ignore[arg-type]
        ),
        **({"models": models} if models else {}),  # type: ignore[arg-type]
    )
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models}
    pool = NodePool({s.name: s for s in sources}, placement, rng=Ordered())
    metrics = RelayMetrics(m.id for m in settings.models)
    return relay_for(settings, pool, metrics=metrics), pool, metrics


def _request(model: str = "synthetic", **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        messages=(ChatMessage(Role.USER, "say hello"),),
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
    )


async def _collect(relay: Relay, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in relay.stream(request)]


def _count(metrics: RelayMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "tokenrelay_continuations_total", {"model": "synthetic", "reason": reason}
    )
    return value or 0.0


async def test_a_node_failing_mid_stream_is_continued_on_another_with_no_gap() -> None:
    a = ContinuingSource("a:1", WORDS, fail_after=5)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, metrics = _relay(a, b)
    await pool.probe_once()
    chunks = await _collect(relay, _request(max_tokens=10, seed=7, stop=["zz"]))
    assert "".join(c.text for c in chunks) == "".join(WORDS[:10])  # one answer, spliced
    assert [c.start is not None for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert chunks[0].start is not None and chunks[0].start.node == "a:1"
    end = chunks[-1].end
    assert end is not None and end.finish_reason is FinishReason.LENGTH
    assert all(c.end is None for c in chunks[:-1])
    # The continuation: the same prompt with the text so far as the assistant's partial turn,
    # max_tokens reduced by what was produced, the same seed and stop sequences.
    assert b.prompts == [a.prompts[0] + "".join(WORDS[:5])]
    assert b.samplings[0] == dataclasses.replace(a.samplings[0], max_tokens=5)
    # Usage counts both attempts, the continuation's (longer) prompt included.
    a_prompt, b_prompt = len(a.prompts[0].split()), len(b.prompts[0].split())
    assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (a_prompt + b_prompt, 10)
    assert end.continued is not None and end.continued.count == 1
    assert (end.continued.usage.prompt_tokens, end.continued.usage.completion_tokens) == (
        b_prompt,
        5,
    )
    assert _count(metrics, "node_failed") == 1
    assert pool.in_flight("a:1") == pool.in_flight("b:1") == 0
    assert pool.pick("synthetic", exclude={"b:1"}) is None  # a:1 is out of rotation


async def test_a_hung_node_found_by_the_probe_moves_its_streams_at_once() -> None:
    a = ContinuingSource("a:1", WORDS, hang_after=3)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, metrics = _relay(a, b)  # between_tokens_s is 30 s
    await pool.probe_once()
    loop = asyncio.get_running_loop()
    stream = relay.stream(_request())
    texts = [(await anext(stream)).text for _ in range(3)]
    waiting = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.05)  # a while of silence...
    assert not waiting.done()  # ... which nothing notices by itself (between_tokens_s is 30 s)
    a.is_ready = False
    noticed = loop.time()
    await pool.probe_once()
    texts.append((await waiting).text)
    assert loop.time() - noticed < 0.1
    texts += [chunk.text async for chunk in stream]
    assert "".join(texts) == WHOLE
    assert a.cancelled == 1  # the hung request was cancelled at its node
    assert b.prompts[0].endswith("<|im_start|>assistant\n" + "".join(WORDS[:3]))
    assert _count(metrics, "probe_failed") == 1


async def test_a_hung_node_found_by_the_probe_moves_its_waiters_at_once() -> None:
    a = ContinuingSource("a:1", WORDS, first_delay_s=30)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, _ = _relay(a, b)  # first_token_s is 60 s
    await pool.probe_once()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(_collect(relay, _request()))
    assert await eventually(lambda: pool.in_flight("a:1") == 1)  # waiting for a first token
    a.is_ready = False
    noticed = loop.time()
    await pool.probe_once()
    chunks = await waiting
    assert loop.time() - noticed < 0.1
    assert chunks[0].start is not None and chunks[0].start.node == "b:1"
    assert "".join(c.text for c in chunks) == WHOLE
    end = chunks[-1].end
    assert end is not None and end.continued is None  # a retry, not a continuation
    assert a.cancelled == 1


async def test_a_failed_probe_with_nowhere_else_to_go_leaves_the_requests_be() -> None:
    slow = ContinuingSource("a:1", WORDS, interval_s=0.02)
    relay, pool, _ = _relay(slow)
    await pool.probe_once()
    streaming = asyncio.create_task(_collect(relay, _request()))
    assert await eventually(lambda: pool.in_flight("a:1") == 1)
    slow.is_ready = False  # a probe that timed out on a node that was only slow
    await pool.probe_once()
    chunks = await streaming  # moving it would only have failed it
    assert "".join(c.text for c in chunks) == WHOLE and len(slow.prompts) == 1


async def test_a_stall_past_between_tokens_is_continued() -> None:
    a = ContinuingSource("a:1", WORDS, hang_after=4)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, metrics = _relay(a, b, timeouts=Timeouts(between_tokens_s=0.1))
    await pool.probe_once()
    chunks = await _collect(relay, _request())
    assert "".join(c.text for c in chunks) == WHOLE
    assert _count(metrics, "stalled") == 1


async def test_continuation_off_or_used_up_ends_the_stream_with_the_error_and_all_usage() -> None:
    off = Continuation(enabled=False)
    a, b = ContinuingSource("a:1", WORDS, fail_after=2), ContinuingSource("b:1", WORDS)
    relay, pool, _ = _relay(a, b, continuation=off)
    await pool.probe_once()
    received: list[str] = []
    with pytest.raises(UpstreamUnavailable) as failure:
        async for chunk in relay.stream(_request()):
            received.append(chunk.text)
    assert "".join(received) == "".join(WORDS[:2]) and not b.prompts
    assert failure.value.usage is not None and failure.value.usage.completion_tokens == 2

    # One continuation allowed: the second failure ends the stream; usage counts both attempts.
    a = ContinuingSource("a:1", WORDS, fail_after=2)
    b = ContinuingSource("b:1", WORDS, fail_after=3)
    c = ContinuingSource("c:1", WORDS)
    relay, pool, _ = _relay(a, b, c, continuation=Continuation(max_continuations=1))
    await pool.probe_once()
    received = []
    with pytest.raises(UpstreamUnavailable) as failure:
        async for chunk in relay.stream(_request()):
            received.append(chunk.text)
    assert "".join(received) == "".join(WORDS[:5]) and not c.prompts
    usage = failure.value.usage
    assert usage is not None and usage.completion_tokens == 5
    assert usage.prompt_tokens == len(a.prompts[0].split()) + len(b.prompts[0].split())


async def test_two_continuations_never_go_back_to_a_node_that_failed_the_answer() -> None:
    a = ContinuingSource("a:1", WORDS, hang_after=2)  # a stall: a:1 stays in rotation
    b = ContinuingSource("b:1", WORDS, fail_after=3)
    c = ContinuingSource("c:1", WORDS)
    relay, pool, _ = _relay(a, b, c, timeouts=Timeouts(between_tokens_s=0.1))
    await pool.probe_once()
    chunks = await _collect(relay, _request())
    assert "".join(c.text for c in chunks) == WHOLE
    # Routing ties go to a:1, which is eligible again, but it failed this answer already.
    assert (len(a.prompts), len(b.prompts), len(c.prompts)) == (1, 1, 1)
    end = chunks[-1].end
    assert end is not None and end.continued is not None and end.continued.count == 2
    assert end.usage.completion_tokens == len(WORDS)


async def test_no_continuation_past_the_deadline_or_without_another_node() -> None:
    a = ContinuingSource("a:1", WORDS, hang_after=3)
    relay, pool, _ = _relay(a, ContinuingSource("b:1", WORDS))
    await pool.probe_once()
    with pytest.raises(UpstreamTimeout, match="deadline"):
        async for _ in relay.stream(_request(), time_budget_s=0.2):
            pass
    alone = ContinuingSource("a:1", WORDS, fail_after=3)
    relay, pool, _ = _relay(alone)
    await pool.probe_once()
    with pytest.raises(UpstreamUnavailable):
        await _collect(relay, _request())


async def test_a_node_lost_with_the_last_token_ends_the_answer_by_length() -> None:
    class Truncating(ContinuingSource):
        """Sends max_tokens words without a finish reason, then fails."""

        async def generate(self, model, prompt, sampling, request_id, headers=()):  # type: ignore[no-untyped-def]
            async for delta in super().generate(model, prompt, sampling, request_id, headers):
                if delta.finish_reason is not None:
                    yield dataclasses.replace(delta, finish_reason=None)
                    raise UpstreamUnavailable("gone")
                yield delta

    a, b = Truncating("a:1", WORDS), ContinuingSource("b:1", WORDS)
    relay, pool, _ = _relay(a, b)
    await pool.probe_once()
    chunks = await _collect(relay, _request(max_tokens=4))
    assert "".join(c.text for c in chunks) == "".join(WORDS[:4])
    end = chunks[-1].end
    assert end is not None and end.finish_reason is FinishReason.LENGTH
    assert not b.prompts


def _fallback_models(continues: bool) -> tuple[ModelSpec, ...]:
    return (
        ModelSpec(
            "synthetic", "big", nodes=("a:1",), fallback="small", fallback_continues=continues
        ),
        ModelSpec("small", "small", nodes=("b:1",)),
    )


@pytest.mark.parametrize("continues", [True, False])
async def test_the_fallback_continues_only_where_the_catalog_allows(continues: bool) -> None:
    a = ContinuingSource("a:1", WORDS, fail_after=3)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, _ = _relay(a, b, models=_fallback_models(continues))
    await pool.probe_once()
    received: list[str] = []
    if continues:
        received = [c.text for c in await _collect(relay, _request())]
        assert "".join(received) == WHOLE
        assert b.prompts == [a.prompts[0] + "".join(WORDS[:3])]
    else:
        with pytest.raises(UpstreamUnavailable):
            async for chunk in relay.stream(_request()):
                received.append(chunk.text)
        assert "".join(received) == "".join(WORDS[:3]) and not b.prompts


def test_a_continuation_plan_is_the_prompt_and_the_text_so_far() -> None:
    settings = Settings()
    planner = Planner(settings.models, settings.orchestrator.limits)
    (plan,) = planner.plans(_request(max_tokens=50, seed=3, stop=["!"], temperature=0.7))
    continued = planner.continuation(plan, "The answer so far", 20, 1)
    assert continued.prompt == plan.prompt + "The answer so far"
    assert plan.prompt.endswith("<|im_start|>assistant\n")
    assert continued.request.sampling == dataclasses.replace(plan.request.sampling, max_tokens=30)
    assert continued.request.request_id == plan.request.request_id + "-c1"
    assert continued.spec == plan.spec and continued.fallback == plan.fallback


def test_fallback_continues_needs_a_fallback() -> None:
    with pytest.raises(ValueError, match="needs a fallback"):
        ModelSpec("m", "m", fallback_continues=True)


TOOLS_MODEL = ModelSpec(id="synthetic", triton_model="synthetic", tool_parser="hermes")
WEATHER = Tool("get_weather", "The weather in a city", '{"type": "object"}')
CALL_WORDS = (
    "Let",
    " me",
    " check.",
    "\n<tool_call>",
    '\n{"name": "get_weather",',
    ' "arguments": {}}',
    "\n</tool_call>",
)


async def test_a_text_answer_of_a_request_with_tools_is_continued_through_its_parser() -> None:
    # The parser read " w0 … w4" from a:1; the continuation's words go through the same parser
    # and the answer reads as one.
    a = ContinuingSource("a:1", WORDS, fail_after=5)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, _ = _relay(a, b, models=(TOOLS_MODEL,))
    await pool.probe_once()
    request = dataclasses.replace(_request(max_tokens=10), tools=(WEATHER,))
    chunks = await _collect(relay, request)
    assert "".join(c.text for c in chunks) == "".join(WORDS[:10])
    end = chunks[-1].end
    assert end is not None and end.continued is not None and end.continued.count == 1
    assert end.finish_reason is FinishReason.LENGTH
    assert b.prompts == [a.prompts[0] + "".join(WORDS[:5])]


async def test_an_answer_whose_tool_call_began_is_not_continued() -> None:
    # A continuation would restart the call (or its arguments) from text the caller never saw.
    a = ContinuingSource("a:1", CALL_WORDS, fail_after=5)
    b = ContinuingSource("b:1", CALL_WORDS)
    relay, pool, metrics = _relay(a, b, models=(TOOLS_MODEL,))
    await pool.probe_once()
    request = dataclasses.replace(_request(), tools=(WEATHER,))
    got: list[Chunk] = []
    with pytest.raises(UpstreamUnavailable) as failure:
        async for chunk in relay.stream(request):
            got.append(chunk)
    assert "".join(c.text for c in got) == "Let me check.\n"
    assert [p.name for c in got for p in c.tool_calls if p.id] == ["get_weather"]
    assert failure.value.usage is not None and failure.value.usage.completion_tokens == 5
    assert b.prompts == [] and _count(metrics, "node_failed") == 0


async def test_an_answer_under_a_constraint_is_not_continued() -> None:
    # The grammar would start over after the partial text instead of going on from it.
    words = ('{"a":', " 1,", ' "b":', " 2}")
    a = ContinuingSource("a:1", words, fail_after=2)
    b = ContinuingSource("b:1", words)
    relay, pool, _ = _relay(a, b, models=(TOOLS_MODEL,))
    await pool.probe_once()
    request = dataclasses.replace(
        _request(), response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)
    )
    with pytest.raises(UpstreamUnavailable) as failure:
        await _collect(relay, request)
    assert failure.value.usage is not None and failure.value.usage.completion_tokens == 2
    assert b.prompts == []


async def test_each_of_n_choices_is_continued_on_its_own() -> None:
    # Choice 0 and choice 1 race on a:1 first (ties go to it); a:1 fails once, in whichever
    # generation comes first, and that choice alone is continued on b:1.
    a = ContinuingSource("a:1", WORDS, fail_after=4)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, metrics = _relay(a, b, models=(TOOLS_MODEL,))
    await pool.probe_once()
    chunks = await _collect(relay, dataclasses.replace(_request(max_tokens=8), n=2))
    ends = {c.index: c.end for c in chunks if c.end is not None}
    assert sorted(ends) == [0, 1]
    for index in (0, 1):
        assert "".join(c.text for c in chunks if c.index == index) == "".join(WORDS[:8])
    continued = [e for e in ends.values() if e is not None and e.continued is not None]
    assert len(continued) == 1 and continued[0].continued is not None
    assert continued[0].continued.count == 1
    assert _count(metrics, "node_failed") == 1
    assert len([c for c in chunks if c.start is not None]) == 1


async def test_the_ledger_counts_every_choice_and_continuation_and_the_prompt_once() -> None:
    a = ContinuingSource("a:1", WORDS, fail_after=4)
    b = ContinuingSource("b:1", WORDS)
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=("a:1", "b:1")), models=(TOOLS_MODEL,)
    )
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models}
    pool = NodePool({"a:1": a, "b:1": b}, placement, rng=Ordered())
    ledger = RecordingLedger()
    relay = Relay(
        settings,
        Planner(settings.models, settings.orchestrator.limits),
        pool,
        AdmissionControl(settings.orchestrator.admission),
        RelayMetrics(m.id for m in settings.models),
        ledger=ledger,  # type: ignore[arg-type]
    )
    await pool.probe_once()
    chunks = await _collect(relay, dataclasses.replace(_request(max_tokens=8), n=2))
    prompts = sorted((len(p.split()) for p in a.prompts + b.prompts), reverse=True)
    assert len(prompts) == 3  # two choices, one continuation (the longest prompt)
    continuation, prompt = prompts[0], prompts[1]
    assert [e.usage.completion_tokens for c in chunks if (e := c.end) is not None] == [8, 8]
    assert [row[2:] for row in ledger.rows] == [("length", prompt + continuation, 16)]


async def test_a_continuation_is_an_event_on_the_requests_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    a = ContinuingSource("a:1", WORDS, fail_after=5)
    b = ContinuingSource("b:1", WORDS)
    relay, pool, _ = _relay(a, b)
    await pool.probe_once()
    with provider.get_tracer("test").start_as_current_span("GenerateStream"):
        await _collect(relay, _request(max_tokens=10))
    (span,) = exporter.get_finished_spans()
    (event,) = [e for e in span.events if e.name == "tokenrelay.continued"]
    assert event.attributes is not None
    attributes = dict(event.attributes)
    gap = attributes.pop("tokenrelay.gap_s")
    assert isinstance(gap, float) and 0 <= gap < 5
    assert attributes == {
        "tokenrelay.from_node": "a:1",
        "tokenrelay.to_node": "b:1",
        "tokenrelay.served_model": "synthetic",
        "tokenrelay.reason": "node_failed",
        "tokenrelay.after_tokens": 5,
    }
    assert span.attributes is not None and span.attributes["tokenrelay.continuations"] == 1
