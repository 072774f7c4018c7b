"""Where n > 1, token limits, stream intervals and logprobs meet in the relay: what a caller is
told it used, what the ledger counts, what is never dropped, and a lagging caller's merging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import pytest

from _support import ContinuingSource, FakeSource, Ordered, RecordingLedger, relay_for
from tokenrelay.config import ModelSpec, OrchestratorSettings, Settings
from tokenrelay.config.tenancy import Tenancy, Tier
from tokenrelay.errors import Overloaded
from tokenrelay.generation import (
    ChatMessage,
    Chunk,
    Delta,
    FinishReason,
    GenerationRequest,
    Role,
    Sampling,
    TokenLogprob,
)
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Planner
from tokenrelay.orchestrator._pool import NodePool, Placement
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.tenancy import Caller, LocalLimits

WORDS = tuple(f" w{i}" for i in range(30))


def _settings(*names: str, **spec: object) -> Settings:
    return Settings(
        orchestrator=OrchestratorSettings(triton=names),
        models=(ModelSpec(id="synthetic", triton_model="synthetic", **spec),),  # type: ignore[arg-type]
        tenancy=Tenancy(tiers=(Tier("standard", tokens_per_minute=40),), token_chunk=1),
    )


def _pool(settings: Settings, *sources: FakeSource) -> NodePool:
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models}
    return NodePool({s.name: s for s in sources}, placement, rng=Ordered())


def _request(n: int = 1, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model="synthetic",
        messages=(ChatMessage(Role.USER, "say hello"),),
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
        n=n,
    )


async def test_a_token_limit_ending_n_choices_reports_what_all_of_them_delivered() -> None:
    # 40 tokens a minute: the prompt (4) once, then 36 of the choices' tokens, wherever they went.
    settings = _settings("a:1")
    source = FakeSource("a:1", words=WORDS, interval_s=0.002)
    pool = _pool(settings, source)
    ledger = RecordingLedger()
    relay = Relay(
        settings,
        Planner(settings.models, settings.orchestrator.limits),
        pool,
        AdmissionControl(settings.orchestrator.admission),
        RelayMetrics(m.id for m in settings.models),
        limits=LocalLimits(),
        ledger=ledger,  # type: ignore[arg-type]
    )
    await pool.probe_once()
    delivered = {0: 0, 1: 0}
    with pytest.raises(Overloaded) as refused:
        async for chunk in relay.stream(
            _request(n=2, max_tokens=30), identity=relay.tenants.identify(Caller("k"))
        ):
            delivered[chunk.index] += len(chunk.text.split())
    usage = refused.value.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, sum(delivered.values())) == (4, 36)
    assert [row[2:] for row in ledger.rows] == [("overloaded", 4, 36)]


async def test_deltas_held_by_a_stream_interval_go_out_when_their_node_is_lost() -> None:
    # w1-w3 arrive and wait for company; the probe finds a:1 hung meanwhile. They were counted,
    # so they go out before the continuation, which goes on after them.
    a = ContinuingSource("a:1", WORDS[:12], hang_after=4, interval_s=0.005)
    b = ContinuingSource("b:1", WORDS[:12], interval_s=0.005)
    settings = _settings("a:1", "b:1", stream_interval_ms=80)
    pool = _pool(settings, a, b)
    relay = relay_for(settings, pool)
    await pool.probe_once()
    stream = relay.stream(_request(max_tokens=10))
    chunks = [await anext(stream)]  # w0 alone; the relay now holds for 80 ms
    following = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.04)  # into the hold: a:1 is found hung while w1-w3 wait in it
    a.is_ready = False
    await pool.probe_once()
    chunks.append(await following)
    chunks += [chunk async for chunk in stream]
    assert "".join(c.text for c in chunks) == "".join(WORDS[:10])
    assert b.prompts[0].endswith("".join(WORDS[:4])) and b.samplings[0].max_tokens == 6
    end = chunks[-1].end
    assert end is not None and end.usage.completion_tokens == 10


class _SplitCharacter(FakeSource):
    """A first token that decodes to no text yet (half a UTF-8 character, as vLLM holds it)."""

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        yield Delta("", 1, 3, None, (TokenLogprob("\\xe2\\x82", -0.1),))
        yield Delta("€", 1, 3, None, (TokenLogprob("\\xac", -0.2),))
        yield Delta(" ok", 1, 3, FinishReason.STOP, (TokenLogprob(" ok", -0.3),))


async def test_every_token_keeps_its_logprob_even_one_without_text() -> None:
    settings = _settings("a:1")
    pool = _pool(settings, _SplitCharacter("a:1"))
    relay = relay_for(settings, pool)
    await pool.probe_once()
    chunks = [chunk async for chunk in relay.stream(_request(top_logprobs=0))]
    assert [e.token for c in chunks for e in c.logprobs] == ["\\xe2\\x82", "\\xac", " ok"]
    end = chunks[-1].end
    assert end is not None and end.usage.completion_tokens == 3


class _Eager(FakeSource):
    """Produces at its own pace whether it is read or not (as a gRPC stream buffers)."""

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        async def produce() -> None:
            for i in range(40):
                await asyncio.sleep(0.001)
                queue.put_nowait(Delta(f" w{i}", 1, 3, FinishReason.STOP if i == 39 else None))

        producing = asyncio.create_task(produce())
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            producing.cancel()


@pytest.mark.parametrize("n", [1, 2])
async def test_a_lagging_caller_gets_merged_chunks_whatever_its_n(n: int) -> None:
    settings = _settings("a:1")
    pool = _pool(settings, _Eager("a:1"))
    relay = relay_for(settings, pool)
    await pool.probe_once()
    chunks: list[Chunk] = []
    async for chunk in relay.stream(_request(n=n)):
        chunks.append(chunk)
        if len(chunks) > 2 * n:  # keeps up at first (the pace is the model's), then lags
            await asyncio.sleep(0.02)
    for index in range(n):
        text = "".join(c.text for c in chunks if c.index == index)
        assert text == "".join(f" w{i}" for i in range(40))
    assert len(chunks) < 20 * n  # 40 tokens each, merged while the caller lags
