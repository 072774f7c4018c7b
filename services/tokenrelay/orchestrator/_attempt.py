"""One try of a request on one leased node, from sending it to giving the node back.

Every wait on the node — for the first delta, and for each later one — runs under the attempt's
watch: when the pool finds the node hung or unable to serve (its probe failed, ``Lease.lost``)
the wait ends at once with ``UpstreamUnavailable``, so the race retries elsewhere and a stream
is continued elsewhere, instead of waiting for a watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from types import TracebackType
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from tokenrelay._readahead import ReadAhead
from tokenrelay.errors import GenerationFailed, InvalidRequest, UpstreamUnavailable
from tokenrelay.generation import Delta, TokenLogprob
from tokenrelay.orchestrator._plan import Plan
from tokenrelay.orchestrator._pool import Lease, Outcome
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
        self._watching: asyncio.Timeout | None = None
        lease.on_lost = self._lost

    @property
    def node(self) -> str:
        return self.lease.node

    def count(self, delta: Delta) -> None:
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += delta.output_tokens

    @property
    def lost(self) -> bool:
        """Whether the pool found the node unable to serve while this attempt ran on it."""
        return self.lease.lost

    def _lost(self) -> None:
        watching = self._watching
        if watching is not None and not watching.expired():
            watching.reschedule(asyncio.get_running_loop().time())

    def watch(self) -> _Watch:
        """An async context for one wait on the node: it ends the wait with
        ``UpstreamUnavailable`` as soon as the node is lost (at once if it already is)."""
        return _Watch(self)

    async def _first_content(self) -> Delta:
        # Deltas without text (a token that ends inside a UTF-8 character, or is held for a
        # stop string) are counted; their logprobs ride with the first delta that has text.
        skipped: tuple[TokenLogprob, ...] = ()
        async with self.watch():
            while True:
                try:
                    delta = await anext(self.deltas)
                except StopAsyncIteration:
                    raise GenerationFailed(
                        "The model ended without finishing its answer."
                    ) from None
                self.count(delta)
                if delta.text or delta.finish_reason is not None:
                    if skipped:
                        delta = dataclasses.replace(delta, logprobs=skipped + delta.logprobs)
                    return delta
                skipped += delta.logprobs

    def follow(self, arrived: Callable[[Delta], None]) -> ReadAhead[Delta]:
        """The reader of the rest of the stream, once ``first`` has returned; each ``take``
        is watched (``watch``)."""
        self.reader = _Watched(self, arrived)
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


class _Watch:
    """``Attempt.watch``: a timeout with no deadline that the lost node makes expire now."""

    __slots__ = ("_attempt", "_timeout")

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt
        self._timeout = asyncio.timeout(0.0 if attempt.lost else None)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._attempt._watching = self._timeout

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._attempt._watching = None
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            raise UpstreamUnavailable(
                "The inference node stopped answering its readiness probe."
            ) from None


class _Watched(ReadAhead[Delta]):
    """The attempt's deltas after the first, each ``take`` under the attempt's watch."""

    def __init__(self, attempt: Attempt, arrived: Callable[[Delta], None]) -> None:
        super().__init__(attempt.deltas, arrived=arrived, last=_last)
        self._attempt = attempt

    async def take(self, *args: Any, **kwargs: Any) -> list[Delta]:
        try:
            async with self._attempt.watch():
                return await super().take(*args, **kwargs)
        except UpstreamUnavailable:
            # The node was lost while deltas waited for company (a stream interval's hold):
            # they were counted, so they go out first; the next take raises at once.
            held = self.ready()
            if held:
                return held
            raise


def _last(delta: Delta) -> bool:
    return delta.finish_reason is not None
