"""A three-state circuit breaker for one Triton node.

CLOSED lets every request through and watches how they end: ``failure_threshold`` consecutive
failures, or a failure share of at least ``failure_rate`` among the requests that ended in the
last ``window_s`` (once there are ``min_requests`` of them), open it. OPEN lets nothing through
for ``cooldown_s``; then it is HALF_OPEN and lets up to ``half_open_probes`` requests through at
once as trials. A trial that succeeds closes it; one that fails opens it again for another
cool-down. ``trip()`` opens it at once (the node is unreachable, its readiness probe failed).

Requests admitted while CLOSED that end after the state changed do not decide anything: only
trials move a HALF_OPEN breaker. A request that ends neither well nor badly (the caller went
away, a hedged twin won, the request itself was invalid) is ``NEUTRAL`` and just gives its trial
slot back. The clock is injected so that every transition is tested without sleeping.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenrelay.config import Breaker

__all__ = ["BreakerState", "CircuitBreaker", "Outcome", "Permit"]

log = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class Permit:
    """A request let through; hand it back to ``record`` exactly once."""

    trial: bool
    epoch: int  # the breaker's state changes so far, when the permit was given


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: Breaker,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (ended at, failed)
        self._opened_at = 0.0
        self._trials = 0
        self.transitions = 0

    @property
    def state(self) -> BreakerState:
        """The state now (an OPEN breaker whose cool-down has passed reads HALF_OPEN)."""
        self._refresh()
        return self._state

    def available(self) -> bool:
        """Whether ``acquire`` would let a request through now."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and self._trials < self._settings.half_open_probes
        )

    def acquire(self) -> Permit | None:
        """Let one request through, or None."""
        if not self.available():
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._trials += 1
            return Permit(trial=True, epoch=self.transitions)
        return Permit(trial=False, epoch=self.transitions)

    def record(self, permit: Permit, outcome: Outcome) -> None:
        """How the request let through with ``permit`` ended."""
        current = permit.epoch == self.transitions  # given in the state the breaker is in
        if permit.trial:
            if not current:
                return
            self._trials -= 1
            if outcome is not Outcome.NEUTRAL:
                if outcome is Outcome.SUCCESS:
                    self._reset()
                    self._move(BreakerState.CLOSED)
                else:
                    self._open()
            return
        if not current or outcome is Outcome.NEUTRAL:
            return
        now = self._clock()
        failed = outcome is Outcome.FAILURE
        self._window.append((now, failed))
        self._consecutive = self._consecutive + 1 if failed else 0
        if failed and (self._consecutive >= self._settings.failure_threshold or self._rate_high()):
            self._open()

    def trip(self) -> None:
        """Open now (or restart the cool-down of an open breaker)."""
        self._open()

    def _rate_high(self) -> bool:
        horizon = self._clock() - self._settings.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()
        if len(self._window) < self._settings.min_requests:
            return False
        failures = sum(1 for _, failed in self._window if failed)
        return failures / len(self._window) >= self._settings.failure_rate

    def _refresh(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._settings.cooldown_s
        ):
            self._move(BreakerState.HALF_OPEN)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._reset()
        self._move(BreakerState.OPEN)

    def _reset(self) -> None:
        self._consecutive = 0
        self._window.clear()

    def _move(self, state: BreakerState) -> None:
        before = self._state
        if before is state:
            return
        self._state = state
        self.transitions += 1
        if state is not BreakerState.HALF_OPEN:
            self._trials = 0
        log.warning(
            "circuit breaker changed",
            extra={"fields": {"node": self.name, "from": before.value, "to": state.value}},
        )
        if self._on_change is not None:
            self._on_change(self.name, before, state)
