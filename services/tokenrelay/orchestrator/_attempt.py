"""One try of a request on one leased node, from sending it to giving the node back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from opentelemetry.trace import SpanKind, Status, StatusCode

from tokenrelay._readahead import ReadAhead
from tokenrelay.errors import GenerationFailed, InvalidRequest, UpstreamUnavailable
from tokenrelay.generation import Delta
from tokenrelay.orchestrator._breaker import Outcome
from tokenrelay.orchestrator._plan import Plan
from tokenrelay.orchestrator._pool import Lease
from tokenrelay.tracing import inject, tracer

__all__ = ["Attempt", "judge"]


def judge(exc: BaseException) -> tuple[Outcome, bool]:
    """What a failed attempt says about its node: (breaker outcome, node unreachable)."""
    if isinstance(exc, InvalidRequest):
        return Outcome.NEUTRAL, False  # the request's fault, not the node's
    return Outcome.FAILURE, isinstance(exc, UpstreamUnavailable)


class Attempt:
    """The request of ``plan`` sent to ``lease``'s node. ``first`` reads up to the first delta
    that carries text or ends the answer; whoever wins the race reads the rest (``follow``).
    ``stop`` ends it whatever state it is in, and gives the node back exactly once."""

    def __init__(self, plan: Plan, lease: Lease, started: float, why: str) -> None:
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
        # Its failure is read by the race, or not at all when the attempt is stopped first.
        self.first.add_done_callback(lambda task: task.cancelled() or task.exception())
        self.reader: ReadAhead[Delta] | None = None
        self._stopped = False

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

    def follow(self, arrived: Callable[[Delta], None]) -> ReadAhead[Delta]:
        """The reader of the rest of the stream, once ``first`` has returned."""
        self.reader = ReadAhead(
            self.deltas, arrived=arrived, last=lambda d: d.finish_reason is not None
        )
        return self.reader

    async def stop(self, outcome: Outcome, node_down: bool = False) -> None:
        """Cancel the generation if it still runs (which cancels the Triton request), then give
        the node back, telling its breaker ``outcome``. A second call does nothing.

        The node is given back before anything is awaited, so a cancellation that interrupts
        the clean-up (a caller gone twice, a deadline) can never leave it counted in flight."""
        if self._stopped:
            return
        self._stopped = True
        self.lease.release(outcome, node_down)
        self.span.set_attribute("gen_ai.usage.output_tokens", self.completion_tokens)
        self.span.set_attribute("tokenrelay.breaker_outcome", outcome.value)
        if outcome is Outcome.FAILURE:
            self.span.set_status(Status(StatusCode.ERROR, "the node failed"))
        self.span.end()
        try:
            if not self.first.done():
                self.first.cancel()
                await asyncio.gather(self.first, return_exceptions=True)
            if self.reader is not None:
                await self.reader.close()
        finally:
            with contextlib.suppress(Exception):  # already failed: nothing more to learn
                await self.deltas.aclose()
