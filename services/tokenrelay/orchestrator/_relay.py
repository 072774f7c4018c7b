"""The orchestrator's logic: from a caller's request to a stream of chunks from a Triton node.

One request goes through these stages, each in a module of its own:

1. the plan (``_plan``): the model resolved in the catalog, the request validated, the chat
   template rendered, defaults filled — for the model and for its fallback;
2. the caller's token limits (``tokenrelay.tenancy.TokenMeter``: refused now when its tokens
   per minute or budget are spent), an admission slot by the caller's priority and fair share
   (``_admission``), and inside it, when asked, the retrieval stage (``tokenrelay.retrieval``)
   adding context to the plans;
3. the first-token race (``_race``): attempts on nodes, with retry, hedging, the first-token
   watchdog and the deadline;
4. following the winner (here): the rest of its stream under the between-tokens watchdog and the
   deadline, counted as it comes, read for tool calls when the plan offers tools (``_tools``) —
   and charged to the caller's token limits before each piece goes out: a piece the limits
   cannot cover is withheld, and the stream ends there with the limit's error (429) and the
   usage delivered so far;
5. continuation (``_continue``): once a token has gone out, a node that fails, is found hung or
   stalls does not end the answer — another node continues it (the prompt plus the text so far)
   and its stream is spliced in. When it cannot be continued (also: an answer under a
   constraint, or one whose tool call has begun), the stream ends with an error that carries
   the usage so far.

A request for n > 1 answers runs steps 3 to 5 once per choice, concurrently (each choice its own
race, so choices spread over the least busy nodes, each from its own seed, derived from the
request's); their chunks interleave as they come, each with its choice's index. The request
holds one admission slot whatever its n (``limits.max_n`` bounds it), and its prompt is charged
once.

A caller that keeps up gets every delta as it comes, read straight from the node. Once a caller
takes longer over a chunk than the model over a token (a busy loop, a slow client), the rest of
the stream is read ahead by a task of its own (``tokenrelay._readahead``), and the deltas that
arrive while the caller is busy go out merged, as one chunk (coalescing): fewer, larger chunks
instead of a backlog of one message per token.

With a stream interval (the request's ``stream_interval_ms``, else the model's), the stream is
read ahead from the first chunk on, and a delta that arrives within the interval of the previous
chunk waits for the interval's end so that those arriving meanwhile ride along: at most one chunk
per interval, each delta delayed by at most the interval. The first token never waits, nor does
the end of the answer, nor a delta that comes later than the interval after the previous chunk.
Transport-free: the gRPC servicer converts to and from protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from tokenrelay.config import ModelSpec, Settings
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    RelayError,
    UpstreamTimeout,
)
from tokenrelay.generation import (
    Chunk,
    Delta,
    FinishReason,
    GenerationRequest,
    StreamEnd,
    StreamStart,
    ToolCallDelta,
    Usage,
    merge_deltas,
)
from tokenrelay.logs import bind
from tokenrelay.orchestrator._admission import Slots
from tokenrelay.orchestrator._continue import Continuer
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Plan, Planner
from tokenrelay.orchestrator._pool import NodePool, Outcome
from tokenrelay.orchestrator._race import Attempt, FirstTokenRace, judge
from tokenrelay.orchestrator._record import Record
from tokenrelay.orchestrator._tools import ToolCallParser
from tokenrelay.retrieval import Retriever
from tokenrelay.tenancy import (
    Identity,
    LimitStore,
    TenantMetrics,
    Tenants,
    TokenMeter,
    UsageLedger,
)
from tokenrelay.tracing import tracer

__all__ = ["ModelStatus", "Relay"]

log = logging.getLogger(__name__)


def _limit_of(exc: Overloaded) -> str:
    """Which token limit refused: ``budget`` or ``tokens_per_minute``."""
    return "budget" if isinstance(exc, QuotaExceeded) else "tokens_per_minute"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    spec: ModelSpec
    ready: bool
    created: int


class Relay:
    """Serves generation requests over a ``NodePool``. Safe for any number of concurrent calls."""

    def __init__(
        self,
        settings: Settings,
        planner: Planner,
        pool: NodePool,
        admission: Slots,
        metrics: RelayMetrics,
        retriever: Retriever | None = None,
        limits: LimitStore | None = None,
        tenant_metrics: TenantMetrics | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        """``limits``: where callers' token limits are counted (none: token limits are not
        enforced); ``tenant_metrics`` and ``ledger``: per-tenant accounting, when given."""
        self._orchestrator = settings.orchestrator
        self._tenants = Tenants(settings.tenancy)
        self._token_chunk = settings.tenancy.token_chunk
        self._limits = limits
        self._tenant_metrics = tenant_metrics
        self._ledger = ledger
        self._planner = planner
        self._pool = pool
        self._admission = admission
        self._metrics = metrics
        self._retriever = retriever
        orchestrator = settings.orchestrator
        self._continuer = Continuer(
            orchestrator.continuation,
            planner,
            pool,
            orchestrator.routing,
            orchestrator.timeouts.first_token_s,
            metrics,
        )
        self.created = int(time.time())  # when the catalog was loaded

    @property
    def admission(self) -> Slots:
        return self._admission

    @property
    def metrics(self) -> RelayMetrics:
        return self._metrics

    def models(self) -> list[ModelStatus]:
        """The catalog's models and whether each can serve now."""
        return [
            ModelStatus(spec, self._pool.ready(spec.id), self.created)
            for spec in self._planner.specs
        ]

    @property
    def tenants(self) -> Tenants:
        return self._tenants

    async def stream(
        self,
        request: GenerationRequest,
        time_budget_s: float | None = None,
        identity: Identity | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Generate ``request``'s answer as chunks, for ``identity`` (None: anonymous).

        Raises ``InvalidRequest``/``ModelNotFound`` before anything is sent to a node,
        ``Overloaded`` when no admission slot frees up in time or the caller's tokens per
        minute are spent (also mid-stream), ``QuotaExceeded`` when its budget is,
        ``LimitsUnavailable`` when its limits cannot be checked, ``UpstreamUnavailable`` when no
        node can serve, ``UpstreamTimeout`` when a watchdog or the budget (``time_budget_s``, the
        caller's remaining deadline) expires, ``GenerationFailed`` when the model fails — after
        the first token, only when the answer could not be continued elsewhere. Closing the
        iterator cancels the generation on the node.
        """
        loop = asyncio.get_running_loop()
        identity = identity or self._tenants.anonymous
        record = Record(
            self._metrics,
            request.model,
            loop.time(),
            identity=identity,
            tenants=self._tenant_metrics,
            ledger=self._ledger,
        )
        record.span.set_attributes(
            {
                "tokenrelay.key_id": identity.key_id,
                "tokenrelay.tier": identity.tier,
                "tokenrelay.priority": identity.priority.name.lower(),
            }
        )
        meter = (
            TokenMeter(self._limits, identity, self._token_chunk)
            if self._limits is not None and identity.metered_tokens
            else None
        )
        try:
            with tracer().start_as_current_span("tokenrelay.validate"):
                if request.tools or request.response_format.schema:
                    # Schema checks take CPU in proportion to the schemas: off the event loop.
                    await asyncio.to_thread(self._planner.precheck, request)
                plans = self._planner.plans(request)
                if request.retrieval is not None:
                    if self._retriever is None:
                        raise InvalidRequest(
                            "Retrieval is not enabled on this server (retrieval.store = none).",
                            "retrieval",
                        )
                    self._retriever.check(request.retrieval)
            primary = plans[0]
            with bind(
                request_id=primary.request.request_id,
                model=primary.spec.id,
                key_id=identity.key_id,
                tier=identity.tier,
            ):
                total = self._orchestrator.timeouts.total_s
                budget = total if time_budget_s is None else min(total, time_budget_s)
                deadline = record.began + budget
                try:
                    if meter is not None:
                        await self._open(meter, record)
                    async with self._admission.slot(budget, identity):
                        # Inside the slot: a request refused for load costs no embedding or
                        # search either.
                        if self._retriever is not None and request.retrieval is not None:
                            plans = await self._retrieve(plans, deadline - loop.time())
                        choices = (
                            self._choice(plans, 0, deadline, record, meter)
                            if request.n == 1
                            else self._choices(plans, request.n, deadline, record, meter)
                        )
                        # aclosing: closing this stream must close the inner one too, which
                        # cancels the generation at the node now, not when the GC runs.
                        ended = 0
                        async with aclosing(choices) as chunks:
                            async for chunk in chunks:
                                if chunk.end is not None:
                                    ended += 1
                                    if ended == request.n:
                                        # Complete once its last chunk is handed over: a caller
                                        # that leaves right after it (the edge closes the call
                                        # on the end) did not cancel anything.
                                        record.complete(chunk.end.finish_reason.value)
                                yield chunk
                except BaseException as exc:
                    record.fail(exc)
                    raise
                finally:  # the outcome is known here, and the request's log fields still bound
                    if record.attempts:
                        record.log(loop.time())
        except BaseException as exc:  # refused before the request was bound (invalid, unknown)
            record.fail(exc)
            raise
        finally:
            if meter is not None:
                await meter.close()
            record.observe(loop.time())

    async def _open(self, meter: TokenMeter, record: Record) -> None:
        """Refuse now when the caller's tokens are spent (counted per limit)."""
        try:
            await meter.open()
        except (QuotaExceeded, Overloaded) as exc:
            self._refused(record, _limit_of(exc))
            raise

    def _refused(self, record: Record, limit: str) -> None:
        identity = record.identity
        if self._tenant_metrics is not None and identity is not None:
            self._tenant_metrics.refused.labels(identity.label, identity.tier, limit).inc()
        log.info("token limit reached", extra={"fields": {"limit": limit}})

    async def _retrieve(self, plans: list[Plan], budget_s: float) -> list[Plan]:
        """The retrieval stage, run for the primary plan; its context goes into every plan."""
        assert self._retriever is not None
        primary = plans[0]
        max_tokens = primary.request.sampling.max_tokens or primary.spec.default_max_tokens
        with tracer().start_as_current_span("tokenrelay.retrieval"):
            augmented, report = await self._retriever.augment(
                primary.request, primary.spec, max_tokens, budget_s
            )
        return self._planner.with_context(plans, augmented, report)

    async def _choice(
        self,
        plans: list[Plan],
        index: int,
        deadline: float,
        record: Record,
        meter: TokenMeter | None,
    ) -> AsyncGenerator[Chunk, None]:
        """One answer: its first-token race, then the winner's stream."""
        loop = asyncio.get_running_loop()
        race = FirstTokenRace(
            plans,
            self._pool,
            self._orchestrator.routing,
            self._orchestrator.timeouts.first_token_s,
            deadline,
            record.attempts,
        )
        try:
            attempt, first = await race.run()
        finally:
            record.retries += race.retries
            record.hedges += race.hedges
        record.winners.append(attempt)
        if record.ttft_s is None:  # the request's first token (of any choice)
            record.ttft_s = loop.time() - record.began
        # One parser for the answer, across its continuations: a continuation goes on from the
        # text that went out, which the parser has read.
        plan = attempt.plan
        parser = plan.tools.parser() if plan.tools is not None else None
        opening = attempt

        def follow(a: Attempt, f: Delta, d: float, r: Record) -> AsyncGenerator[Chunk, None]:
            # The prompt is charged once, by choice 0's first attempt (the choices share it);
            # a continuation charges its own.
            paid = index > 0 and a is opening
            return self._follow(a, f, d, r, meter, index, parser, paid)

        def resumable() -> bool:
            return plan.continuable and (parser is None or parser.resumable)

        rest = self._continuer.stream(
            follow, plans, attempt, first, deadline, record, index, resumable
        )
        # aclosing: closing this stream must close the inner one too, which cancels the
        # generation at the node now, not when the GC runs.
        async with aclosing(rest):
            async for chunk in rest:
                yield chunk

    async def _choices(
        self,
        plans: list[Plan],
        n: int,
        deadline: float,
        record: Record,
        meter: TokenMeter | None,
    ) -> AsyncGenerator[Chunk, None]:
        """``n`` answers at once, each in a task of its own; their chunks as they come. The
        stream's start goes out once (with the first choice to answer); the first failure ends
        every choice, and carries the usage of all of them so far."""
        # Bounded: a choice's hand-over waits while the caller is behind, so each choice sees
        # its caller lag and reads ahead, merging what piles up (as a single answer does).
        queue: asyncio.Queue[Chunk | Exception | None] = asyncio.Queue(maxsize=n)

        async def run(index: int) -> None:
            try:
                choice = self._choice(_seeded(plans, index), index, deadline, record, meter)
                async with aclosing(choice) as chunks:
                    async for chunk in chunks:
                        await queue.put(chunk)
                await queue.put(None)
            except Exception as exc:  # handed to the consumer; a cancellation just ends it
                await queue.put(exc)

        tasks = [asyncio.create_task(run(index)) for index in range(n)]
        try:
            started, running = False, n
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    # A token limit's refusal carries what was delivered (of every choice);
                    # any other failure what all the choices generated.
                    if isinstance(item, RelayError):
                        delivered = record.delivered
                        item.usage = (
                            Usage(record.prompt_tokens, record.completion_tokens)
                            if delivered is None
                            else Usage(*delivered)
                        )
                    raise item
                if item.start is not None:
                    if started:
                        item = dataclasses.replace(item, start=None)
                    started = True
                yield item
        finally:
            for task in tasks:
                task.cancel()  # each closes its choice, which cancels its Triton request
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(
        self,
        attempt: Attempt,
        first: Delta,
        deadline: float,
        record: Record,
        meter: TokenMeter | None,
        index: int = 0,
        parser: ToolCallParser | None = None,
        prompt_paid: bool = False,
    ) -> AsyncGenerator[Chunk, None]:
        """The winning attempt's stream, from its first content on, as choice ``index``. An
        error raised once tokens went out carries the usage so far (``RelayError.usage``);
        ``meter`` is charged before each piece goes out (the prompt with choice 0's only).

        With tools, the text goes through the plan's tool-call parser: what it holds back (a
        possible call) goes out later or as tool-call pieces, and an answer that may hold only
        one call ends as soon as it is complete (the generation is cancelled)."""
        between_s = self._orchestrator.timeouts.between_tokens_s
        gaps = self._metrics.itl.labels(record.label)
        loop = asyncio.get_running_loop()
        plan = attempt.plan
        pending_start: StreamStart | None = StreamStart(
            plan.request.request_id, plan.spec.id, attempt.node, plan.fallback, plan.retrieval
        )
        outcome, node_down = Outcome.NEUTRAL, False
        last = loop.time()
        gap = math.inf  # between the last two deltas

        def arrived(delta: Delta) -> None:
            nonlocal last, gap
            now = loop.time()
            gap = now - last
            gaps.observe(gap)
            last = now
            attempt.count(delta)

        reader = attempt.follow(arrived)
        interval = plan.stream_interval_s
        hold_until: float | None = None
        delta = first
        # What went out so far: the prompt once (with choice 0), then each piece's tokens (the
        # first piece also counts the empty deltas read before it).
        sent_prompt, sent_completion = (attempt.prompt_tokens if prompt_paid else 0), 0
        cost = attempt.completion_tokens
        try:
            while True:
                if meter is not None:
                    try:
                        await meter.charge(attempt.prompt_tokens - sent_prompt + cost)
                    except (QuotaExceeded, Overloaded) as exc:
                        outcome = Outcome.NEUTRAL  # the caller's limit, not the node's fault
                        self._refused(record, _limit_of(exc))
                        record.delivered = (record.sent_prompt, record.sent_completion)
                        # This attempt's; the continuation chain adds its earlier attempts'.
                        exc.usage = Usage(sent_prompt, sent_completion)
                        raise
                record.sent_prompt += attempt.prompt_tokens - sent_prompt
                record.sent_completion += cost
                sent_prompt, sent_completion = attempt.prompt_tokens, sent_completion + cost
                end = None
                calls: tuple[ToolCallDelta, ...] = ()
                text, finish = delta.text, delta.finish_reason
                if parser is not None:
                    text, calls, finish = _parse(parser, delta)
                if finish is not None:
                    usage = Usage(attempt.prompt_tokens, attempt.completion_tokens)
                    end = StreamEnd(finish, usage)
                    outcome = Outcome.SUCCESS  # the node answered in full, caller there or not
                if text or end is not None or calls or delta.logprobs or pending_start:
                    handed = loop.time()
                    yield Chunk(text, pending_start, end, index, calls, delta.logprobs)
                    pending_start = None
                    taken_at = loop.time()
                    if interval:
                        reader.start()
                        hold_until = taken_at + interval
                    elif taken_at - handed > gap:
                        # The caller took longer over a chunk than the model over a token: it
                        # falls behind, so read ahead and merge what piles up meanwhile.
                        reader.start()
                if end is not None:
                    return
                wait = min(between_s, deadline - loop.time())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        taken = await reader.take(hold_until)
                except TimeoutError:
                    if wait < between_s:
                        raise UpstreamTimeout(
                            "The request's deadline expired before the answer was complete."
                        ) from None
                    outcome = Outcome.FAILURE
                    raise UpstreamTimeout(
                        f"The model produced no token for {between_s:g} s."
                    ) from None
                except RelayError as exc:
                    outcome, node_down = judge(exc)
                    raise
                except Exception:  # a token source's bug: logged, and the answer ends as failed
                    log.exception("token source failed mid-stream")
                    outcome = Outcome.FAILURE
                    raise GenerationFailed("The model failed while generating.") from None
                if not taken:
                    outcome = Outcome.FAILURE
                    raise GenerationFailed("The model ended without finishing its answer.")
                delta = merge_deltas(taken)
                cost = delta.output_tokens
        except RelayError as exc:
            if exc.usage is None:
                exc.usage = Usage(attempt.prompt_tokens, attempt.completion_tokens)
            raise
        finally:
            await attempt.stop(outcome, node_down)


def _parse(
    parser: ToolCallParser, delta: Delta
) -> tuple[str, tuple[ToolCallDelta, ...], FinishReason | None]:
    """A delta through the tool-call parser: its text, tool-call pieces and finish reason (the
    answer ends early once the parser has all the calls the answer may hold)."""
    parsed = parser.feed(delta.text)
    finish = delta.finish_reason
    if finish is None and not parser.done:
        return parsed.text, parsed.calls, None
    rest = parser.close()
    if parser.calls and (finish is None or finish is FinishReason.STOP):
        finish = FinishReason.TOOL_CALLS
    return parsed.text + rest.text, parsed.calls + rest.calls, finish


def _seeded(plans: list[Plan], index: int) -> list[Plan]:
    """The plans of choice ``index``: the request's seed plus ``index`` (wrapped to int64), so
    that choices differ and a seeded request repeats; an unseeded one stays unseeded."""
    out = []
    for plan in plans:
        sampling = plan.request.sampling
        if index == 0 or sampling.seed is None:
            out.append(plan)
            continue
        seed = (sampling.seed + index + 2**63) % 2**64 - 2**63
        request = dataclasses.replace(
            plan.request, sampling=dataclasses.replace(sampling, seed=seed)
        )
        out.append(dataclasses.replace(plan, request=request))
    return out
