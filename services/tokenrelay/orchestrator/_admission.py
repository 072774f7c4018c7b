"""Admission control: at most ``max_concurrent`` generations run; up to ``max_queue`` more wait,
first come first served, for at most ``queue_timeout_s``. Anything past that is refused at once
with ``Overloaded`` (RESOURCE_EXHAUSTED, 429), so a burst costs a refusal each, not memory.

A slot freed by a finishing generation passes straight to the oldest waiter, so a newcomer never
overtakes the queue. A waiter that gives up (timeout, caller gone) at the moment it was handed a
slot passes the slot on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from tokenrelay.config import Admission
from tokenrelay.errors import Overloaded
from tokenrelay.tracing import tracer

__all__ = ["AdmissionControl", "Slots"]


class Slots(Protocol):
    """Where a generation gets its slot: this process's ``AdmissionControl``, or, in a worker
    of several, ``tokenrelay._workers.RemoteAdmission`` (the group's one ``AdmissionControl``,
    in its supervisor). ``running`` and ``queued`` count this process's requests."""

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def slot(self, budget_s: float | None = None) -> AbstractAsyncContextManager[None]:
        """Hold one generation slot for the block; raises ``Overloaded`` when none comes in
        time."""
        ...


class AdmissionControl:
    def __init__(self, settings: Admission) -> None:
        self._settings = settings
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._waiters)  # a waiter leaves the queue as it gets its slot or gives up

    def _refuse(self, why: str) -> Overloaded:
        return Overloaded(why, self._settings.retry_after_s)

    @asynccontextmanager
    async def slot(self, budget_s: float | None = None) -> AsyncIterator[None]:
        """Hold one generation slot for the block; raises ``Overloaded`` when none comes in
        time (the queue timeout, or ``budget_s`` if shorter)."""
        with tracer().start_as_current_span("tokenrelay.admission") as span:
            span.set_attribute("tokenrelay.queued_before", self.queued)
            await self._acquire(budget_s)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, budget_s: float | None) -> None:
        settings = self._settings
        if self._running < settings.max_concurrent and not self.queued:
            self._running += 1
            return
        if self.queued >= settings.max_queue:
            raise self._refuse("The service is at capacity; retry later.")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        wait = (
            settings.queue_timeout_s
            if budget_s is None
            else min(settings.queue_timeout_s, budget_s)
        )
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await asyncio.shield(waiter)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot came as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise self._refuse(
                    "The service is at capacity and no slot freed up in time; retry later."
                ) from None
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; the running count stays
                return
        self._running -= 1
