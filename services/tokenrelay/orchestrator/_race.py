"""The first-token race: attempts on nodes until one yields the answer's first content.

Until the first token reaches the caller nothing is lost by starting over, so this phase may run
several attempts: when a node fails, cannot be reached or stays silent past the first-token
deadline, the request is retried on another node (``max_retries``, within the caller's deadline);
with hedging on, a second node is asked as well once ``hedge_after_s`` passes without a first
token, and the first to answer wins while the other is cancelled. Plans are tried in order for
each launch (the primary model's, then its fallback's), so the fallback answers only when no node
of the primary can.
"""

from __future__ import annotations

import asyncio
import logging
import math

from tokenrelay.config import Routing
from tokenrelay.errors import InvalidRequest, RelayError, UpstreamTimeout, UpstreamUnavailable
from tokenrelay.generation import Delta
from tokenrelay.orchestrator._attempt import Attempt, judge
from tokenrelay.orchestrator._plan import Plan
from tokenrelay.orchestrator._pool import NodePool, Outcome

__all__ = ["FirstTokenRace"]

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
                        await self._stop_all(Outcome.NEUTRAL, "hedged attempt lost")
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
