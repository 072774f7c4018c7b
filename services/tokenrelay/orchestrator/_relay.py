"""The orchestrator's logic: from a caller's request to a stream of chunks from a Triton node.

One request goes through these stages:

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
5. continuation (here, ``Continuer``): once a token has gone out, a node that fails, is found
   hung or stalls does not end the answer — another node continues it (the prompt plus the
   text so far) and its stream is spliced in. When it cannot be continued (also: an answer
   under a constraint, or one whose tool call has begun), the stream ends with an error that
   carries the usage so far.

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

``Record``: what one request did — attempts, winner, continuations, first-token time, outcome —
for its log line, its metrics and the GenAI attributes of its span (filled as the request goes).

Continuation (``Continuer``): an answer that outlives its node.

Once a token has gone out, starting over is no longer an option: the caller holds part of one
answer. But tokenrelay renders the prompt itself, so another node can *continue* it. When the
node serving a stream fails (an error, a stream that ends without finishing), is found hung (its
readiness probe failed: ``Lease.lost``) or stalls past ``between_tokens_s``, and the caller's
deadline has not passed, ``Continuer.stream`` starts a new first-token race over continuation
plans (``Planner.continuation``): the same rendered prompt with the text streamed so far after
it, as the assistant's partial turn, ``max_tokens`` reduced by what was produced, the same stop
sequences and seed. The new node's stream is spliced in: the caller's stream goes on with no gap
in the text and no error; its end carries the usage of every attempt in the chain (the
continuations' prompts included) and says how many continuations there were
(``StreamEnd.continued``). Each continuation is also a span event on the request's span
(``tokenrelay.continued``), a log line and a metric (``tokenrelay_continuations_total``,
``tokenrelay_continuation_gap_seconds``).

The continuation goes to another node of the same model, or to the catalog's fallback when the
model allows it (``fallback_continues``), never back to a node that failed this answer. Out of
continuations (``max_continuations``), with continuation off, past the deadline, for a failure
that is the request's own fault, or when no node can take the continuation, the stream ends as
it always did: with the interrupted node's error, carrying the usage so far.

What it cannot promise: a sampled answer's continuation is a different sample than the first
node would have produced (the seed restarts on the new prompt); greedy decoding continues the
same text up to tokenization (the text so far is tokenized afresh, which may split it
differently from how the model produced it); and the new node reads the whole prompt again, so
the splice costs one prompt's processing, plus the time to notice the failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Span

from tokenrelay.config import Continuation, ModelSpec, Routing, Settings
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import (
    Chunk,
    Continued,
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
from tokenrelay.metrics import outcome_of
from tokenrelay.orchestrator._admission import Slots
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Plan, Planner
from tokenrelay.orchestrator._pool import NodePool, Outcome
from tokenrelay.orchestrator._race import Attempt, judge, race
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

__all__ = ["Continuer", "Follow", "ModelStatus", "Record", "Relay"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    metrics: RelayMetrics
    model: str  # as the caller named it
    began: float  # on the loop's clock
    outcome: str = "failed"
    attempts: list[Attempt] = field(default_factory=list)
    winners: list[Attempt] = field(default_factory=list)  # every choice's, as they came
    continuations: list[Attempt] = field(default_factory=list)  # the answers' later winners
    ttft_s: float | None = None
    retries: int = 0
    hedges: int = 0
    # The call's span, taken now: the request may end where it is no longer current (a stream
    # closed from another task).
    span: Span = field(default_factory=trace.get_current_span)
    label: str = ""  # the model's metrics label
    completed: bool = False  # the last chunk went out
    identity: Identity | None = None
    tenants: TenantMetrics | None = None
    ledger: UsageLedger | None = None
    # What the caller was told it used, when the request ended on a token limit (the usage of
    # the pieces delivered; the one withheld is not counted).
    delivered: tuple[int, int] | None = None
    # What went out so far, over every choice and attempt (the prompt once, and each
    # continuation's).
    sent_prompt: int = 0
    sent_completion: int = 0

    def complete(self, finish_reason: str) -> None:
        """The answer's last chunk is out: it ended with ``finish_reason``, whatever follows."""
        self.outcome, self.completed = finish_reason, True

    def fail(self, exc: BaseException) -> None:
        """Record how the request ended when it did not finish (a request already complete
        stays so: its caller left after the last chunk)."""
        if self.completed:
            return
        cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
        self.outcome = "cancelled" if cancelled else outcome_of(exc)

    @property
    def winner(self) -> Attempt | None:
        """The attempt that produced the request's first token (of any choice)."""
        return self.winners[0] if self.winners else None

    @property
    def prompt_tokens(self) -> int:
        """The prompt tokens of the answer's attempts: the prompt once (all choices share it),
        and each continuation's."""
        if not self.winners:
            return 0
        return self.winners[0].prompt_tokens + sum(c.prompt_tokens for c in self.continuations)

    @property
    def completion_tokens(self) -> int:
        """Every token generated for the request, by losing and failed attempts too."""
        return sum(a.completion_tokens for a in self.attempts)

    def _usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the answers the caller got: their winners' (the
        prompt once) and continuations' — or, when a token limit ended the request, what was
        delivered before it."""
        if self.delivered is not None:
            return self.delivered
        if not self.winners:
            return (0, 0)
        chain = [*self.winners, *self.continuations]
        return self.prompt_tokens, sum(a.completion_tokens for a in chain)

    def _tenant(self) -> None:
        identity = self.identity
        if identity is None:
            return
        prompt, completion = self._usage()
        if self.tenants is not None:
            key, tier = identity.label, identity.tier
            self.tenants.requests.labels(key, tier, self.outcome).inc()
            if prompt:
                self.tenants.tokens.labels(key, tier, "prompt").inc(prompt)
            if completion:
                self.tenants.tokens.labels(key, tier, "completion").inc(completion)
        if self.ledger is not None:
            self.ledger.record(identity.key_id, self.label, self.outcome, prompt, completion)

    def observe(self, now: float) -> None:
        """The request's metrics and span attributes, once it has ended."""
        self._tenant()
        metrics, label = self.metrics, self.label
        metrics.requests.labels(label, self.outcome).inc()
        metrics.duration.labels(label).observe(now - self.began)
        if self.ttft_s is not None:
            metrics.ttft.labels(label).observe(self.ttft_s)
        if self.attempts:
            metrics.prompt_tokens.labels(label).inc(self.prompt_tokens)
            metrics.completion_tokens.labels(label).inc(self.completion_tokens)
        if self.retries:
            metrics.retries.labels(label).inc(self.retries)
        if self.hedges:
            metrics.hedges.labels(label).inc(self.hedges)
        winner = self.winner
        if winner is not None and winner.plan.fallback:
            metrics.fallbacks.labels(label).inc()
        span = self.span
        span.set_attribute("tokenrelay.outcome", self.outcome)
        span.set_attribute("tokenrelay.attempts", len(self.attempts))
        if self.continuations:
            span.set_attribute("tokenrelay.continuations", len(self.continuations))
        if winner is not None:
            span.set_attribute("gen_ai.response.model", winner.plan.spec.id)
            span.set_attribute("gen_ai.usage.input_tokens", self.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", self.completion_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [self.outcome])
            span.set_attribute("tokenrelay.node", winner.node)

    def log(self, now: float) -> None:
        winner = self.winner
        log.info(
            "generation ended",
            extra={
                "fields": {
                    "outcome": self.outcome,
                    "node": winner.node if winner else None,
                    "served_model": winner.plan.spec.id if winner else None,
                    "fallback": bool(winner and winner.plan.fallback),
                    "attempts": len(self.attempts),
                    "continuations": len(self.continuations),
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
                    "duration_s": round(now - self.began, 4),
                }
            },
        )


Follow = Callable[[Attempt, Delta, float, Record], AsyncGenerator[Chunk, None]]
"""The relay's follower of one winning attempt: its chunks from the first delta on; raises the
``RelayError`` that interrupted it."""

# Failures of the node, which another node may not share. Not the request's own faults
# (InvalidRequest and its kind), nor admission's.
_CONTINUABLE = (UpstreamUnavailable, UpstreamTimeout, GenerationFailed)


def _reason(attempt: Attempt, exc: RelayError) -> str:
    """Why ``attempt``'s stream was interrupted, as the metric's label says it."""
    if attempt.lost:
        return "probe_failed"  # the node hung, or lost the model
    if isinstance(exc, UpstreamTimeout):
        return "stalled"
    return "node_failed"


class Continuer:
    """Follows a request's winning attempt and continues its answer elsewhere when the node
    fails; one per relay, safe for any number of concurrent streams."""

    def __init__(
        self,
        settings: Continuation,
        planner: Planner,
        pool: NodePool,
        routing: Routing,
        first_token_s: float,
        metrics: RelayMetrics,
    ) -> None:
        self._settings = settings
        self._planner = planner
        self._pool = pool
        self._routing = routing
        self._first_token_s = first_token_s
        self._metrics = metrics

    async def stream(
        self,
        follow: Follow,
        plans: list[Plan],
        attempt: Attempt,
        first: Delta,
        deadline: float,
        record: Record,
        index: int = 0,
        resumable: Callable[[], bool] = lambda: True,
    ) -> AsyncGenerator[Chunk, None]:
        """``follow``'s chunks for ``attempt`` (the winner of the race over ``plans``; choice
        ``index`` of the request), then, each time it is interrupted and may be continued, those
        of a continuation: one stream, whose only ``start`` is the first attempt's and whose
        ``end`` counts them all. ``resumable`` says whether the answer so far may be continued
        from its text (not under a constraint, no tool call begun). Raises the interruption's
        ``RelayError`` (with the usage of the whole chain) when the answer cannot be continued.
        Closing it closes the attempt that runs (cancelling it at its node)."""
        loop = asyncio.get_running_loop()
        chain = [attempt]
        texts: list[str] = []
        failed: set[str] = set()
        last_at = loop.time()
        while True:
            try:
                async with aclosing(follow(attempt, first, deadline, record)) as chunks:
                    async for chunk in chunks:
                        if len(chain) > 1:
                            spliced = self._spliced(chunk, chain)
                            if spliced is None:
                                continue
                            chunk = spliced
                        texts.append(chunk.text)
                        last_at = loop.time()
                        yield chunk
                return
            except RelayError as exc:
                # The usage so far: the attempts before this one, and what this one says (all
                # it generated, or only what was delivered when a token limit ended it).
                last = exc.usage or Usage(attempt.prompt_tokens, attempt.completion_tokens)
                exc.usage = _add(_usage(chain[:-1]), last)
                reason = _reason(attempt, exc)
                failed.add(attempt.node)
                if not (resumable() and self._may_continue(exc, chain, deadline)):
                    raise
                base = _base_plans(plans, chain[0].plan)
                limit = base[0].request.sampling.max_tokens or base[0].spec.default_max_tokens
                produced = sum(a.completion_tokens for a in chain)
                if produced >= limit:
                    # The node went away with the answer's last token: it ended by length.
                    end = StreamEnd(FinishReason.LENGTH, _usage(chain), _continued(chain))
                    yield Chunk("", None, end, index)
                    return
                text = "".join(texts)
                number = len(chain)
                continuation = [
                    self._planner.continuation(plan, text, produced, number) for plan in base
                ]
                try:
                    attempt, first = await race(
                        record,
                        continuation,
                        self._pool,
                        self._routing,
                        self._first_token_s,
                        deadline,
                        exclude=set(failed),
                        route="continuation",
                    )
                except RelayError as refused:
                    log.warning(
                        "stream could not be continued",
                        extra={"fields": {"node": chain[-1].node, "error": refused.message}},
                    )
                    raise exc from None
                gap = loop.time() - last_at
                self._announce(record, chain[-1], attempt, reason, produced, gap)
                chain.append(attempt)
                record.continuations.append(attempt)

    def _may_continue(self, exc: RelayError, chain: list[Attempt], deadline: float) -> bool:
        settings = self._settings
        return (
            settings.enabled
            and len(chain) <= settings.max_continuations
            and isinstance(exc, _CONTINUABLE)
            and asyncio.get_running_loop().time() < deadline
        )

    @staticmethod
    def _spliced(chunk: Chunk, chain: list[Attempt]) -> Chunk | None:
        """A continuation's chunk as part of the one stream: no second ``start``; the end counts
        the whole chain. None for a chunk left with nothing to say."""
        end = chunk.end
        if end is not None:
            end = dataclasses.replace(end, usage=_usage(chain), continued=_continued(chain))
        elif not (chunk.text or chunk.tool_calls or chunk.logprobs):
            return None
        return dataclasses.replace(chunk, start=None, end=end)

    def _announce(
        self,
        record: Record,
        interrupted: Attempt,
        continuing: Attempt,
        reason: str,
        produced: int,
        gap: float,
    ) -> None:
        """The log line, metrics and span event of one continuation."""
        self._metrics.continuations.labels(record.label, reason).inc()
        self._metrics.continuation_gap.labels(record.label).observe(gap)
        fields: dict[str, str | int | float] = {
            "from_node": interrupted.node,
            "to_node": continuing.node,
            "served_model": continuing.plan.spec.id,
            "reason": reason,
            "after_tokens": produced,
            "gap_s": round(gap, 4),
        }
        log.warning("stream continued on another node", extra={"fields": fields})
        record.span.add_event(
            "tokenrelay.continued",
            {f"tokenrelay.{name}": value for name, value in fields.items()},
        )


def _base_plans(plans: list[Plan], serving: Plan) -> list[Plan]:
    """The plans a continuation may use: the one that served the answer, and after it the
    fallback's when the catalog lets the fallback continue the primary's answers (and it
    writes tool calls in the same format)."""
    base = [p for p in plans if p.spec.id == serving.spec.id]
    primary = plans[0]
    if not serving.fallback and primary.spec.fallback_continues:
        # Only a fallback that writes tool calls as the serving model does: the answer's one
        # parser reads the continuation too.
        tools = serving.tools.format if serving.tools is not None else None
        base += [
            p
            for p in plans
            if p.fallback and (p.tools.format if p.tools is not None else None) == tools
        ]
    return base


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens)


def _usage(chain: list[Attempt]) -> Usage:
    return Usage(sum(a.prompt_tokens for a in chain), sum(a.completion_tokens for a in chain))


def _continued(chain: list[Attempt]) -> Continued | None:
    if len(chain) == 1:
        return None
    return Continued(len(chain) - 1, _usage(chain[1:]))


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
            label=self._metrics.model(request.model),
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
        attempt, first = await race(
            record,
            plans,
            self._pool,
            self._orchestrator.routing,
            self._orchestrator.timeouts.first_token_s,
            deadline,
        )
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

        attempt.arrived = arrived
        reads = attempt.reads
        ahead = False  # reading ahead (``Attempt.read_ahead``)
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
                        if not ahead:
                            attempt.read_ahead()
                            ahead = True
                        hold_until = taken_at + interval
                    elif not ahead and taken_at - handed > gap:
                        # The caller took longer over a chunk than the model over a token: it
                        # falls behind, so read ahead and merge what piles up meanwhile.
                        attempt.read_ahead()
                        ahead = True
                if end is not None:
                    return
                wait = min(between_s, deadline - loop.time())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        taken = await reads.asend(hold_until)
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
