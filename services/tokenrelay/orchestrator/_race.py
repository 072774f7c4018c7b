"""The first-token race: attempts on nodes until one yields the answer's first content.

Until the first token reaches the caller nothing is lost by starting over, so this phase may run
several attempts: when a node fails, cannot be reached or stays silent past the first-token
deadline, the request is retried on another node (``max_retries``, within the caller's deadline);
with hedging on, a second node is asked as well once ``hedge_after_s`` passes without a first
token, and the first to answer wins while the other is cancelled. Plans are tried in order for
each launch (the primary model's, then its fallback's), so the fallback answers only when no node
of the primary can.

Each try is an ``Attempt``: the request on one leased node, from sending it to giving the node back;
the winner's is followed by the relay. Every wait on the node — for the first delta, and for each
later one — runs under the attempt's watch: when the pool finds the node hung or unable to serve
(its probe failed, ``Lease.lost``) the wait ends at once with ``UpstreamUnavailable``, so the race
retries elsewhere and a stream is continued elsewhere, instead of waiting for a watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Protocol

from opentelemetry.trace import SpanKind, Status, StatusCode

from tokenrelay._readahead import ReadAhead
from tokenrelay.config import Routing
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Delta, TokenLogprob
from tokenrelay.orchestrator._plan import Plan
from tokenrelay.orchestrator._pool import Lease, NodePool, Outcome
from tokenrelay.tracing import inject, tracer

__all__ = ["Attempt", "FirstTokenRace", "Tally", "judge", "race"]


def judge(exc: BaseException) -> tuple[Outcome, bool]:
    """What a failed attempt says about its node: (breaker outcome, node unreachable)."""
    if isinstance(exc, InvalidRequest):
        return Outcome.NEUTRAL, False  # the request's fault, not the node's
    return Outcome.FAILURE, isinstance(exc, UpstreamUnavailable)


class Attempt:
    """The request of ``plan`` sent to ``lease``'s node, read by one generator (``reads``) from
    its first delta to its last. The race's task (``first``) runs it up to the first delta that
    carries text or ends the answer; whoever wins the race resumes it for the rest, one step
    per delta — or per batch, once it reads ahead (``read_ahead``). ``stop`` ends it whatever
    state it is in, and gives the node back exactly once."""

    def __init__(self, plan: Plan, lease: Lease, started: float, why: str) -> None:
        self.plan = plan
        self.lease = lease
        self.node = lease.node
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
        sampling = plan.request.sampling
        interval_ms = round(plan.stream_interval_s * 1000)
        if interval_ms:  # the model may merge by it too (fewer responses to read)
            sampling = dataclasses.replace(sampling, stream_interval_ms=interval_ms)
        self.deltas = lease.source.generate(
            lease.triton_model, plan.prompt, sampling, plan.request.request_id, inject(self.span)
        )
        self.arrived: Callable[[Delta], None] | None = None
        """Sees each delta after the first as it comes (in the reading task when reading
        ahead), once counted: set by the follower before it resumes ``reads``."""
        self.reads = self._reads()
        """The attempt's deltas: the first content (``first``), then, for each ``asend`` of a
        hold time (``ReadAhead.take``'s ``hold_until``) or None, the next ones — one, or all
        that arrived meanwhile once reading ahead; empty when the node ended without
        finishing. Each wait is watched (``watch``)."""
        self.first: asyncio.Task[Delta] = asyncio.create_task(self._first())
        self._reader: ReadAhead[Delta] | None = None
        self._stopped = False
        self._watching: asyncio.Timeout | None = None
        lease.on_lost = self._lost

    def _count(self, delta: Delta) -> None:
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += delta.output_tokens

    def _arrive(self, delta: Delta) -> None:
        self._count(delta)
        if self.arrived is not None:
            self.arrived(delta)

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

    def read_ahead(self) -> None:
        """From now on read the node's deltas in a task of their own (``ReadAhead``), so what
        piles up while the follower is busy comes out together. Again is a no-op."""
        if self._reader is None:
            self._reader = ReadAhead(self.deltas, arrived=self._arrive, last=_last)
            self._reader.start()

    async def _first(self) -> Delta:
        return (await anext(self.reads))[0]

    async def _reads(self) -> AsyncGenerator[list[Delta], float | None]:
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
                self._count(delta)
                if delta.text or delta.finish_reason is not None:
                    if skipped:
                        delta = dataclasses.replace(delta, logprobs=skipped + delta.logprobs)
                    break
                skipped += delta.logprobs
        hold_until = yield [delta]
        while True:
            reader = self._reader
            if reader is None:  # reading straight: the next delta
                ended = False
                async with self.watch():  # never left entered across a yield (the follower's)
                    try:
                        delta = await anext(self.deltas)
                    except StopAsyncIteration:
                        ended = True
                if ended:
                    hold_until = yield []
                    continue
                self._arrive(delta)
                hold_until = yield [delta]
                continue
            try:
                async with self.watch():
                    taken = await reader.take(hold_until)
            except UpstreamUnavailable:
                # The node was lost while deltas waited for company (a stream interval's
                # hold): they were counted, so they go out first; the next wait raises at once.
                taken = reader.ready()
                if not taken:
                    raise
            hold_until = yield taken

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
            elif not self.first.cancelled():
                self.first.exception()  # a failure the race did not wait for: read here
            if self._reader is not None:
                await self._reader.close()
            with contextlib.suppress(Exception):  # already failed: nothing more to learn
                await self.reads.aclose()
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


def _last(delta: Delta) -> bool:
    return delta.finish_reason is not None


log = logging.getLogger(__name__)


class FirstTokenRace:
    """One request's race for its first token. ``run`` once; every attempt it launched is also
    appended to ``launched`` (the request's record keeps them for usage and metrics)."""

    def __init__(
        self,
        plans: list[Plan],
        pool: NodePool,
        routing: Routing,
        first_token_s: float,
        deadline: float,
        launched: list[Attempt],
        exclude: set[str] | None = None,
        route: str | None = None,
    ) -> None:
        """``deadline`` is on the loop's clock; ``exclude``: nodes not to try (grows as the
        race tries them, so a caller may pass the set on to a later race); ``route``: why the
        first attempt goes where it goes, for its span (default: how it was routed)."""
        self._plans = plans
        self._pool = pool
        self._routing = routing
        self._first_token_s = first_token_s
        self._deadline = deadline
        self._launched = launched
        self._tried = exclude if exclude is not None else set()
        chars = routing.prefix_affinity_chars
        self._affinity = plans[0].prompt[:chars] if chars > 0 else None
        self._route = route
        self._running: list[Attempt] = []
        self.retries = 0
        self.hedges = 0

    def _launch(self, why: str) -> Attempt | None:
        loop = asyncio.get_running_loop()
        for plan in self._plans:
            lease = self._pool.pick(plan.spec.id, exclude=self._tried, affinity=self._affinity)
            if lease is not None:
                self._tried.add(lease.node)
                attempt = Attempt(
                    plan, lease, loop.time(), f"{why}, fallback" if plan.fallback else why
                )
                self._running.append(attempt)
                self._launched.append(attempt)
                return attempt
        return None

    def _unavailable(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"No inference node is ready to serve '{self._plans[0].spec.id}'."
        )

    async def run(self) -> tuple[Attempt, Delta]:
        """The winning attempt and its first delta; every other attempt is stopped before this
        returns or raises. Raises ``UpstreamUnavailable`` when no node can serve,
        ``UpstreamTimeout`` when the deadline (or, out of retries, the first-token watchdog)
        expires, and the request's own ``InvalidRequest`` at once."""
        loop = asyncio.get_running_loop()
        first = self._launch(
            self._route or ("prefix affinity" if self._affinity is not None else "least in flight")
        )
        if first is None:
            raise self._unavailable()
        hedge_after = self._routing.hedge_after_s
        hedge_at = first.started + hedge_after if hedge_after else math.inf
        last_error: RelayError | None = None
        try:
            while True:
                wake = min(
                    self._deadline,
                    hedge_at,
                    *(a.started + self._first_token_s for a in self._running),
                )
                done, _ = await asyncio.wait(
                    [a.first for a in self._running],
                    timeout=max(wake - loop.time(), 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for attempt in [a for a in self._running if a.first in done]:
                    self._running.remove(attempt)
                    exc = attempt.first.exception()
                    if exc is None:
                        try:
                            await self._stop_all(Outcome.NEUTRAL, "hedged attempt lost")
                        except BaseException:  # the caller left while the losers stopped:
                            await attempt.stop(Outcome.NEUTRAL)  # nobody else stops the winner
                            raise
                        return attempt, attempt.first.result()
                    outcome, node_down = judge(exc)
                    await attempt.stop(outcome, node_down)
                    if not isinstance(exc, RelayError) or isinstance(exc, InvalidRequest):
                        raise exc
                    log.warning(
                        "attempt failed before the first token",
                        extra={"fields": {"node": attempt.node, "error": exc.message}},
                    )
                    last_error = exc
                last_error = await self._watchdog(loop.time()) or last_error
                now = loop.time()
                if now >= self._deadline:
                    raise UpstreamTimeout(
                        "The request's deadline expired before the answer was complete."
                    )
                if now >= hedge_at:
                    hedge_at = math.inf
                    self._hedge()
                if not self._running:
                    self._retry(last_error)
        finally:  # the caller went away, the deadline passed, or the request failed
            await self._stop_all(Outcome.NEUTRAL)

    async def _watchdog(self, now: float) -> RelayError | None:
        """Stop the attempts that waited past the first-token deadline."""
        error = None
        for attempt in [a for a in self._running if now >= a.started + self._first_token_s]:
            self._running.remove(attempt)
            log.warning(
                "first-token watchdog fired",
                extra={
                    "fields": {"node": attempt.node, "waited_s": round(now - attempt.started, 4)}
                },
            )
            await attempt.stop(Outcome.FAILURE)
            error = UpstreamTimeout(
                f"The model produced no first token within {self._first_token_s:g} s."
            )
        return error

    def _hedge(self) -> None:
        hedge = self._launch("hedge")
        if hedge is not None:
            self.hedges += 1
            log.info("hedging", extra={"fields": {"node": hedge.node}})

    def _retry(self, last_error: RelayError | None) -> None:
        """A new attempt on another node, or raise why none can be made."""
        retry = self._launch("retry") if self.retries < self._routing.max_retries else None
        if retry is None:
            raise last_error or self._unavailable()
        self.retries += 1
        log.info("retrying on another node", extra={"fields": {"node": retry.node}})

    async def _stop_all(self, outcome: Outcome, why: str = "") -> None:
        """Stop every running attempt; each gives its node back even if stopping another is
        interrupted."""
        running, self._running = self._running, []
        for attempt in running:  # leases first: nothing below awaits before this loop ends
            attempt.lease.release(outcome)
        for attempt in running:
            if why:
                log.info(why, extra={"fields": {"node": attempt.node}})
            await attempt.stop(outcome)


class Tally(Protocol):
    """Where a request keeps what its races did (the relay's ``Record``)."""

    attempts: list[Attempt]
    retries: int
    hedges: int


async def race(
    tally: Tally,
    plans: list[Plan],
    pool: NodePool,
    routing: Routing,
    first_token_s: float,
    deadline: float,
    exclude: set[str] | None = None,
    route: str | None = None,
) -> tuple[Attempt, Delta]:
    """Run a ``FirstTokenRace`` (see its ``run``), counting its attempts, retries and hedges
    into ``tally`` whatever its end."""
    first_token_race = FirstTokenRace(
        plans, pool, routing, first_token_s, deadline, tally.attempts, exclude, route
    )
    try:
        return await first_token_race.run()
    finally:
        tally.retries += first_token_race.retries
        tally.hedges += first_token_race.hedges
