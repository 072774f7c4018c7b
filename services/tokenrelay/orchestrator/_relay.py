"""The orchestrator's logic: from a caller's request to a stream of chunks from a Triton node.

One request goes through these stages, each in a module of its own:

1. the plan (``_plan``): the model resolved in the catalog, the request validated, the chat
   template rendered, defaults filled — for the model and for its fallback;
2. an admission slot (``_admission``), and inside it, when asked, the retrieval stage
   (``tokenrelay.retrieval``) adding context to the plans;
3. the first-token race (``_race``): attempts on nodes, with retry, hedging, the first-token
   watchdog and the deadline;
4. following the winner (here): the rest of its stream under the between-tokens watchdog and the
   deadline, counted as it comes.

Once a token has gone out, a failure ends the stream with an error that carries the usage so
far: the caller already holds part of one answer, and a second would not continue it.

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
import logging
import math
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from tokenrelay.config import ModelSpec, Settings
from tokenrelay.errors import GenerationFailed, InvalidRequest, RelayError, UpstreamTimeout
from tokenrelay.generation import (
    Chunk,
    Delta,
    GenerationRequest,
    StreamEnd,
    StreamStart,
    Usage,
    merge_deltas,
)
from tokenrelay.logs import bind
from tokenrelay.orchestrator._admission import Slots
from tokenrelay.orchestrator._attempt import Attempt, judge
from tokenrelay.orchestrator._breaker import Outcome
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Plan, Planner
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._race import FirstTokenRace
from tokenrelay.orchestrator._record import Record
from tokenrelay.retrieval import Retriever
from tokenrelay.tracing import tracer

__all__ = ["ModelStatus", "Relay"]

log = logging.getLogger(__name__)


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
    ) -> None:
        self._orchestrator = settings.orchestrator
        self._planner = planner
        self._pool = pool
        self._admission = admission
        self._metrics = metrics
        self._retriever = retriever
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
        record = Record(self._metrics, request.model, loop.time())
        try:
            with tracer().start_as_current_span("tokenrelay.validate"):
                plans = self._planner.plans(request)
                if request.retrieval is not None:
                    if self._retriever is None:
                        raise InvalidRequest(
                            "Retrieval is not enabled on this server (retrieval.store = none).",
                            "retrieval",
                        )
                    self._retriever.check(request.retrieval)
            primary = plans[0]
            with bind(request_id=primary.request.request_id, model=primary.spec.id):
                total = self._orchestrator.timeouts.total_s
                budget = total if time_budget_s is None else min(total, time_budget_s)
                deadline = record.began + budget
                try:
                    async with self._admission.slot(budget):
                        # Inside the slot: a request refused for load costs no embedding or
                        # search either.
                        if self._retriever is not None and request.retrieval is not None:
                            plans = await self._retrieve(plans, deadline - loop.time())
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
                            record.retries, record.hedges = race.retries, race.hedges
                        record.winner = attempt
                        record.ttft_s = loop.time() - record.began
                        # aclosing: closing this stream must close the inner one too, which
                        # cancels the generation at the node now, not when the GC runs.
                        async with aclosing(self._follow(attempt, first, deadline, record)) as rest:
                            async for chunk in rest:
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
            record.observe(loop.time())

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

    async def _follow(
        self, attempt: Attempt, first: Delta, deadline: float, record: Record
    ) -> AsyncGenerator[Chunk, None]:
        """The winning attempt's stream, from its first content on. An error raised once tokens
        went out carries the usage so far (``RelayError.usage``)."""
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
                    taken_at = loop.time()
                    if interval:
                        reader.start()
                        hold_until = taken_at + interval
                    elif taken_at - handed > gap:
                        # The caller took longer over a chunk than the model over a token: it
                        # falls behind, so read ahead and merge what piles up meanwhile.
                        reader.start()
                if end is not None:
                    outcome, record.outcome = Outcome.SUCCESS, end.finish_reason.value
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
        except RelayError as exc:
            exc.usage = Usage(attempt.prompt_tokens, attempt.completion_tokens)
            raise
        finally:
            await attempt.stop(outcome, node_down)
