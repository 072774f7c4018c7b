"""The orchestrator's logic: from a caller's request to a stream of chunks from a Triton node.

Resolve the model in the catalog, validate, apply the chat template, wait for an admission slot,
when asked run the retrieval stage (context into the prompt), lease a node, stream the answer under
three watchdogs (first token, silence between tokens, total deadline), count usage.
Transport-free: the gRPC servicer converts to and from protobuf.

Until the first token reaches the caller nothing is lost by starting over, so that phase
(``_first_token``) may run several attempts: when a node fails, cannot be reached or stays
silent past the first-token deadline, the request is retried on another node (``max_retries``,
within the caller's deadline); with hedging on, a second node is asked as well once
``hedge_after_s`` passes without a first token, and the first to answer wins while the other is
cancelled. When no node of the model can serve, its fallback model (if the catalog names one)
answers, and the stream's start says so. Once a token has gone out, a failure ends the stream
with an error: the caller already holds part of one answer, and a second would not continue it.

A caller that keeps up gets every delta as it comes, read straight from the node. Once a caller
takes longer over a chunk than the model over a token (a busy loop, a slow client), the rest of
the stream is read ahead by a task of its own (``_Reader``), and the deltas that arrive while the
caller is busy go out merged, as one chunk (coalescing): fewer, larger chunks instead of a
backlog of one message per token. Nothing ever waits for company; the first token never does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from tokenrelay.config import ModelSpec, Settings
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Delta, FinishReason, GenerationRequest, RetrievalReport, Usage
from tokenrelay.logs import bind
from tokenrelay.metrics import RelayMetrics, outcome_of
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.orchestrator._breaker import Outcome
from tokenrelay.orchestrator._pool import Lease, NodePool
from tokenrelay.orchestrator._validate import validate
from tokenrelay.retrieval._stage import Retriever
from tokenrelay.templates import ChatTemplate
from tokenrelay.tracing import inject, tracer

__all__ = ["Chunk", "ModelStatus", "Relay", "StreamEnd", "StreamStart"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamStart:
    request_id: str
    model: str
    node: str
    fallback: bool = False
    retrieval: RetrievalReport | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a stream: ``start`` on the first only, ``end`` on the last only."""

    text: str
    start: StreamStart | None = None
    end: StreamEnd | None = None


@dataclass(frozen=True, slots=True)
class ModelStatus:
    spec: ModelSpec
    ready: bool
    created: int


@dataclass(frozen=True, slots=True)
class _Plan:
    """A request made ready for one catalog model: validated, templated, defaults filled."""

    spec: ModelSpec
    prompt: str
    request: GenerationRequest
    fallback: bool = False
    retrieval: RetrievalReport | None = None


def _merge(deltas: list[Delta]) -> Delta:
    """Consecutive deltas of one answer as one."""
    if len(deltas) == 1:
        return deltas[0]
    prompt_tokens = [d.prompt_tokens for d in deltas if d.prompt_tokens is not None]
    return Delta(
        "".join(d.text for d in deltas),
        sum(d.output_tokens for d in deltas),
        prompt_tokens[-1] if prompt_tokens else None,
        deltas[-1].finish_reason,
    )


class _Reader:
    """Reads a stream of deltas for ``take``: straight from the source while the caller keeps
    up; once the caller is seen to lag (``read_ahead``), in a task of its own, so that ``take``
    returns everything that arrived since the last call as one delta. ``arrived`` sees each
    delta as it comes (counting, inter-token gaps). Holds at most the rest of one answer."""

    def __init__(self, deltas: AsyncIterator[Delta], arrived: Callable[[Delta], None]) -> None:
        self._deltas = deltas
        self._arrived = arrived
        self._pending: list[Delta] = []
        self._ended: BaseException | None = None  # why reading stopped: StopAsyncIteration
        self._waiter: asyncio.Future[None] | None = None  # or the source's error
        self._task: asyncio.Task[None] | None = None

    def read_ahead(self) -> None:
        """From now on read in a task (call between ``take``s; again is a no-op). Reading
        ahead costs a task switch per delta, so it starts only when the caller falls behind."""
        if self._task is None:
            self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for delta in self._deltas:
                self._arrived(delta)
                self._pending.append(delta)
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_result(None)
                if delta.finish_reason is not None:
                    break
            self._ended = StopAsyncIteration()
        except Exception as exc:  # handed to the consumer, who raises it after what came before
            self._ended = exc
        finally:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def take(self) -> Delta | None:
        """The next delta — or, reading ahead, all that arrived since the last call as one;
        None once the stream ended without another (a source's error is raised instead)."""
        if self._task is None:
            try:
                delta = await anext(self._deltas)
            except StopAsyncIteration:
                return None
            self._arrived(delta)
            return delta
        if not self._pending and self._ended is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._pending:
            merged = _merge(self._pending)
            self._pending = []
            return merged
        if self._ended is None or isinstance(self._ended, StopAsyncIteration):
            return None
        raise self._ended

    async def close(self) -> None:
        """Stop reading ahead (before the stream itself is closed)."""
        if self._task is not None:
            self._task.cancel()  # a no-op once it has ended
            await asyncio.gather(self._task, return_exceptions=True)


class _Attempt:
    """One try of a request on one leased node. ``first`` reads up to the first delta that
    carries text or ends the answer; the rest is read by whoever won (``follow``)."""

    def __init__(self, plan: _Plan, lease: Lease, started: float, why: str) -> None:
        self.plan = plan
        self.lease = lease
        self.started = started
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # One CLIENT span per attempt; its traceparent goes to Triton with the request, so
        # Triton's own spans join the trace under it.
        self.span = tracer().start_span(
            "triton.generate",
            kind=SpanKind.CLIENT,
            attributes={
                "server.address": lease.node,
                "tokenrelay.triton_model": lease.triton_model,
                "tokenrelay.route": why,
                "tokenrelay.fallback": plan.fallback,
                "gen_ai.request.model": plan.spec.id,
                # Triton's own spans carry the same attribute: with Triton 2.51 the streaming
                # endpoint starts a trace of its own instead of continuing traceparent, and
                # this is how the two are found together.
                "triton.request_id": plan.request.request_id,
            },
        )
        self.deltas = lease.source.generate(
            lease.triton_model,
            plan.prompt,
            plan.request.sampling,
            plan.request.request_id,
            inject(self.span),
        )
        self.first: asyncio.Task[Delta] = asyncio.create_task(self._first_content())
        self.reader: _Reader | None = None

    @property
    def node(self) -> str:
        return self.lease.node

    def count(self, delta: Delta) -> None:
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += delta.output_tokens

    async def _first_content(self) -> Delta:
        while True:
            try:
                delta = await anext(self.deltas)
            except StopAsyncIteration:
                raise GenerationFailed("The model ended without finishing its answer.") from None
            self.count(delta)
            if delta.text or delta.finish_reason is not None:
                return delta

    def follow(self, arrived: Callable[[Delta], None]) -> _Reader:
        """The reader of the rest of the stream, once ``first`` has returned."""
        self.reader = _Reader(self.deltas, arrived)
        return self.reader

    async def stop(self, outcome: Outcome, node_down: bool = False) -> None:
        """Cancel the generation if it still runs (which cancels the Triton request), then give
        the node back, telling its breaker ``outcome``."""
        if not self.first.done():
            self.first.cancel()
            await asyncio.gather(self.first, return_exceptions=True)
        if self.reader is not None:
            await self.reader.close()
        await self.deltas.aclose()
        self.lease.release(outcome, node_down)
        self.span.set_attribute("gen_ai.usage.output_tokens", self.completion_tokens)
        self.span.set_attribute("tokenrelay.breaker_outcome", outcome.value)
        if outcome is Outcome.FAILURE:
            self.span.set_status(Status(StatusCode.ERROR, "the node failed"))
        self.span.end()


@dataclass(slots=True)
class _Record:
    """What one request did, for its log line and metrics (filled as it goes)."""

    label: str  # the metrics' model label
    outcome: str = "failed"
    attempts: list[_Attempt] = dataclasses.field(default_factory=list)
    winner: _Attempt | None = None
    ttft_s: float | None = None
    retries: int = 0
    hedges: int = 0

    def fail(self, exc: BaseException) -> None:
        """Record how the request ended when it did not finish."""
        cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
        self.outcome = "cancelled" if cancelled else outcome_of(exc)

    @property
    def prompt_tokens(self) -> int:
        return self.winner.prompt_tokens if self.winner else 0

    @property
    def completion_tokens(self) -> int:
        """Every token generated for the request, by losing and failed attempts too."""
        return sum(a.completion_tokens for a in self.attempts)


def _annotate(span: Span, record: _Record) -> None:
    """GenAI attributes of the call's span, once the request ended."""
    winner = record.winner
    span.set_attribute("tokenrelay.outcome", record.outcome)
    span.set_attribute("tokenrelay.attempts", len(record.attempts))
    if winner is not None:
        span.set_attribute("gen_ai.response.model", winner.plan.spec.id)
        span.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [record.outcome])
        span.set_attribute("tokenrelay.node", winner.node)


def _judge(exc: BaseException) -> tuple[Outcome, bool]:
    """What a failed attempt says about its node: (breaker outcome, node unreachable)."""
    if isinstance(exc, InvalidRequest):
        return Outcome.NEUTRAL, False  # the request's fault, not the node's
    return Outcome.FAILURE, isinstance(exc, UpstreamUnavailable)


class Relay:
    """Serves generation requests over a ``NodePool``. Safe for any number of concurrent calls."""

    def __init__(
        self,
        settings: Settings,
        pool: NodePool,
        admission: AdmissionControl | None = None,
        metrics: RelayMetrics | None = None,
        retriever: Retriever | None = None,
    ) -> None:
        self._settings = settings
        self.retriever = retriever
        self._pool = pool
        self._admission = admission or AdmissionControl(settings.orchestrator.admission)
        self._metrics = metrics or RelayMetrics(m.id for m in settings.models)
        self._specs: Mapping[str, ModelSpec] = {m.id: m for m in settings.models}
        self._templates = {
            m.id: ChatTemplate(m.chat_template, m.default_system_prompt) for m in settings.models
        }
        self._created = int(time.time())

    @property
    def admission(self) -> AdmissionControl:
        return self._admission

    @property
    def metrics(self) -> RelayMetrics:
        return self._metrics

    def models(self) -> list[ModelStatus]:
        return [
            ModelStatus(spec, self._pool.ready(spec.id), self._created)
            for spec in self._specs.values()
        ]

    def _plan(
        self,
        spec: ModelSpec,
        request: GenerationRequest,
        fallback: bool,
        retrieval: RetrievalReport | None = None,
    ) -> _Plan:
        validate(request, spec, self._settings.orchestrator.limits)
        if request.messages is not None:
            prompt = self._templates[spec.id].render(request.messages)
        else:
            prompt = request.prompt or ""
        sampling = request.sampling
        if sampling.max_tokens is None:
            sampling = dataclasses.replace(sampling, max_tokens=spec.default_max_tokens)
        return _Plan(
            spec, prompt, dataclasses.replace(request, sampling=sampling), fallback, retrieval
        )

    def _plans(
        self, request: GenerationRequest, retrieval: RetrievalReport | None = None
    ) -> list[_Plan]:
        """The primary plan, then the fallback's (if any, and if the request fits it)."""
        spec = self._specs.get(request.model)
        if spec is None:
            if not request.model:
                raise InvalidRequest("'model' is required.", "model")
            raise ModelNotFound(request.model)
        request = dataclasses.replace(request, request_id=request.request_id or uuid.uuid4().hex)
        plans = [self._plan(spec, request, False, retrieval)]
        if spec.fallback:
            try:
                plans.append(self._plan(self._specs[spec.fallback], request, True, retrieval))
            except InvalidRequest as exc:
                log.info(
                    "request does not fit the fallback model",
                    extra={"fields": {"fallback": spec.fallback, "error": exc.message}},
                )
        return plans

    async def stream(
        self, request: GenerationRequest, time_budget_s: float | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Generate ``request``'s answer as chunks.

        Raises ``InvalidRequest``/``ModelNotFound`` before anything is sent to a node,
        ``Overloaded`` when no admission slot frees up in time, ``UpstreamUnavailable`` when no
        node can serve, ``UpstreamTimeout`` when a watchdog or the budget (``time_budget_s``, the
        caller's remaining deadline) expires, ``GenerationFailed`` when the model fails. Closing
        the iterator cancels the generation on the node.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        record = _Record(self._metrics.model(request.model))
        try:
            with tracer().start_as_current_span("tokenrelay.validate"):
                plans = self._plans(request)
                if request.retrieval is not None and self.retriever is None:
                    raise InvalidRequest(
                        "Retrieval is not enabled on this server (retrieval.store = none).",
                        "retrieval",
                    )
            primary = plans[0]
            with bind(request_id=primary.request.request_id, model=primary.spec.id):
                total = self._settings.orchestrator.timeouts.total_s
                budget = total if time_budget_s is None else min(total, time_budget_s)
                deadline = began + budget
                try:
                    async with self._admission.slot(budget):
                        # Inside the slot: a request refused for load costs no embedding or
                        # search either.
                        if request.retrieval is not None:  # a retriever exists (checked above)
                            plans = await self._retrieve(request, primary, deadline - loop.time())
                        attempt, first = await self._first_token(plans, deadline, record)
                        record.ttft_s = loop.time() - began
                        # aclosing: closing this stream must close the inner one too, which
                        # cancels the generation at the node now, not when the GC runs.
                        rest = self._rest(attempt, first, deadline, record)
                        async with aclosing(rest) as chunks:
                            async for chunk in chunks:
                                yield chunk
                except BaseException as exc:
                    record.fail(exc)
                    raise
                finally:  # the outcome is known here, and the request's log fields still bound
                    if record.attempts:
                        self._log(record, loop.time() - began)
        except BaseException as exc:  # refused before the request was bound (invalid, unknown)
            record.fail(exc)
            raise
        finally:
            self._observe(record, loop.time() - began)
            _annotate(trace.get_current_span(), record)

    async def _retrieve(
        self, request: GenerationRequest, primary: _Plan, budget_s: float
    ) -> list[_Plan]:
        """The retrieval stage, then the plans again with the context in the caller's request
        (its request id kept; its max_tokens, or the model's default, sizing the budget)."""
        assert self.retriever is not None
        request = dataclasses.replace(request, request_id=primary.request.request_id)
        max_tokens = primary.request.sampling.max_tokens or primary.spec.default_max_tokens
        with tracer().start_as_current_span("tokenrelay.retrieval"):
            augmented, report = await self.retriever.augment(
                request, primary.spec, max_tokens, budget_s
            )
        return self._plans(augmented, report)

    def _observe(self, record: _Record, duration_s: float) -> None:
        metrics, label = self._metrics, record.label
        metrics.requests.labels(label, record.outcome).inc()
        metrics.duration.labels(label).observe(duration_s)
        if record.ttft_s is not None:
            metrics.ttft.labels(label).observe(record.ttft_s)
        if record.attempts:
            metrics.prompt_tokens.labels(label).inc(record.prompt_tokens)
            metrics.completion_tokens.labels(label).inc(record.completion_tokens)
        if record.retries:
            metrics.retries.labels(label).inc(record.retries)
        if record.hedges:
            metrics.hedges.labels(label).inc(record.hedges)
        if record.winner is not None and record.winner.plan.fallback:
            metrics.fallbacks.labels(label).inc()

    @staticmethod
    def _log(record: _Record, duration_s: float) -> None:
        winner = record.winner
        log.info(
            "generation ended",
            extra={
                "fields": {
                    "outcome": record.outcome,
                    "node": winner.node if winner else None,
                    "served_model": winner.plan.spec.id if winner else None,
                    "fallback": bool(winner and winner.plan.fallback),
                    "attempts": len(record.attempts),
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 4),
                    "duration_s": round(duration_s, 4),
                }
            },
        )

    async def _first_token(
        self, plans: list[_Plan], deadline: float, record: _Record
    ) -> tuple[_Attempt, Delta]:
        """Run attempts until one yields its first content; returns it and that delta. Every
        losing attempt is stopped before this returns; ``record`` keeps them all."""
        loop = asyncio.get_running_loop()
        routing = self._settings.orchestrator.routing
        first_token_s = self._settings.orchestrator.timeouts.first_token_s
        chars = routing.prefix_affinity_chars
        affinity = plans[0].prompt[:chars] if chars > 0 else None
        attempts: list[_Attempt] = []
        tried: set[str] = set()

        def launch(why: str) -> _Attempt | None:
            for plan in plans:
                lease = self._pool.pick(plan.spec.id, exclude=tried, affinity=affinity)
                if lease is not None:
                    tried.add(lease.node)
                    reason = f"{why}, fallback" if plan.fallback else why
                    attempt = _Attempt(plan, lease, loop.time(), reason)
                    attempts.append(attempt)
                    record.attempts.append(attempt)
                    return attempt
            return None

        first_why = "prefix affinity" if affinity is not None else "least in flight"
        if launch(first_why) is None:
            raise UpstreamUnavailable(f"No inference node is ready to serve '{plans[0].spec.id}'.")
        hedge_at = (
            attempts[0].started + routing.hedge_after_s if routing.hedge_after_s else math.inf
        )
        retries = 0
        last_error: RelayError | None = None
        try:
            while True:
                wake = min(deadline, hedge_at, *(a.started + first_token_s for a in attempts))
                done, _ = await asyncio.wait(
                    [a.first for a in attempts],
                    timeout=max(wake - loop.time(), 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for attempt in [a for a in attempts if a.first in done]:
                    attempts.remove(attempt)
                    exc = attempt.first.exception()
                    if exc is None:
                        for loser in attempts:
                            log.info("hedged attempt lost", extra={"fields": {"node": loser.node}})
                            await loser.stop(Outcome.NEUTRAL)
                        attempts.clear()
                        record.winner = attempt
                        return attempt, attempt.first.result()
                    outcome, node_down = _judge(exc)
                    await attempt.stop(outcome, node_down)
                    if not isinstance(exc, RelayError) or isinstance(exc, InvalidRequest):
                        raise exc
                    log.warning(
                        "attempt failed before the first token",
                        extra={"fields": {"node": attempt.node, "error": exc.message}},
                    )
                    last_error = exc
                now = loop.time()
                for attempt in [a for a in attempts if now >= a.started + first_token_s]:
                    attempts.remove(attempt)
                    log.warning(
                        "first-token watchdog fired",
                        extra={
                            "fields": {
                                "node": attempt.node,
                                "waited_s": round(now - attempt.started, 4),
                            }
                        },
                    )
                    await attempt.stop(Outcome.FAILURE)
                    last_error = UpstreamTimeout(
                        f"The model produced no first token within {first_token_s:g} s."
                    )
                if now >= deadline:
                    raise UpstreamTimeout(
                        "The request's deadline expired before the answer was complete."
                    )
                if now >= hedge_at:
                    hedge_at = math.inf
                    hedge = launch("hedge")
                    if hedge is not None:
                        record.hedges += 1
                        log.info("hedging", extra={"fields": {"node": hedge.node}})
                if not attempts:
                    retry = launch("retry") if retries < routing.max_retries else None
                    if retry is None:
                        raise last_error or UpstreamUnavailable(
                            f"No inference node is ready to serve '{plans[0].spec.id}'."
                        )
                    retries += 1
                    record.retries += 1
                    log.info("retrying on another node", extra={"fields": {"node": retry.node}})
        finally:
            for attempt in attempts:  # the caller went away, or the deadline passed
                await attempt.stop(Outcome.NEUTRAL)

    async def _rest(
        self, attempt: _Attempt, first: Delta, deadline: float, record: _Record
    ) -> AsyncGenerator[Chunk, None]:
        """The winning attempt's stream, from its first content on. An error raised once tokens
        went out carries the usage so far (``RelayError.usage``)."""
        between_s = self._settings.orchestrator.timeouts.between_tokens_s
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
        delta = first
        try:
            while True:
                end = None
                if delta.finish_reason is not None:
                    usage = Usage(attempt.prompt_tokens, attempt.completion_tokens)
                    end = StreamEnd(delta.finish_reason, usage)
                if delta.text or end is not None:
                    handed = loop.time()
                    yield Chunk(delta.text, pending_start, end)
                    pending_start = None
                    if loop.time() - handed > gap:
                        # The caller took longer over a chunk than the model over a token: it
                        # falls behind, so read ahead and merge what piles up meanwhile.
                        reader.read_ahead()
                if end is not None:
                    outcome, record.outcome = Outcome.SUCCESS, end.finish_reason.value
                    return
                wait = min(between_s, deadline - loop.time())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        taken = await reader.take()
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
                    outcome, node_down = _judge(exc)
                    raise
                except Exception:  # a token source's bug: logged, and the answer ends as failed
                    log.exception("token source failed mid-stream")
                    outcome = Outcome.FAILURE
                    raise GenerationFailed("The model failed while generating.") from None
                if taken is None:
                    outcome = Outcome.FAILURE
                    raise GenerationFailed("The model ended without finishing its answer.")
                delta = taken
        except RelayError as exc:
            exc.usage = Usage(attempt.prompt_tokens, attempt.completion_tokens)
            raise
        finally:
            await attempt.stop(outcome, node_down)
