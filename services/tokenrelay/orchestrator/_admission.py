"""Admission control with priority classes and fair queuing.

At most ``max_concurrent`` generations run; up to ``max_queue`` more wait, for at most
``queue_timeout_s`` (or the caller's remaining deadline, if shorter). Past that a request is
refused at once with ``Overloaded`` (RESOURCE_EXHAUSTED, 429, with a Retry-After hint), so a
burst costs a refusal each, not memory.

Who gets a slot that frees up:

1. the highest **priority class** with a request waiting (high, normal, low): a high-priority
   request overtakes every waiting request of a lower class;
2. within that class, the **key** whose turn it is by weighted fair queuing (start-time fair
   queuing, one request a unit): every key with requests waiting is served in proportion to its
   tier's weight, however many requests it has queued, so a key that floods the queue gets its
   share and no more, and a quiet key's request waits for at most one turn of each busy key;
3. within that key, the request whose deadline is **earliest** (EDF).

When the queue is full, a newcomer may still get in by **shedding**: the lowest class is shed
first (its waiter with the latest deadline is refused); within the newcomer's own class, the key
with the most waiters gives one up if it has more than the newcomer's key. Otherwise the newcomer
is refused. A slot freed by a finishing generation passes straight to the next waiter, so a
newcomer never overtakes the queue; a waiter that gives up (timeout, caller gone) at the moment
it was handed a slot passes it on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from tokenrelay.config import Admission
from tokenrelay.errors import Overloaded
from tokenrelay.tenancy import ANONYMOUS, Identity, Priority
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

    def queued_in(self, priority: Priority) -> int:
        """This process's requests of ``priority`` waiting for a slot."""
        ...

    def slot(
        self, budget_s: float | None = None, identity: Identity | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold one generation slot for the block; raises ``Overloaded`` when none comes in
        time (or the request is shed). ``identity``: whose request it is."""
        ...


@dataclass(eq=False, slots=True)
class _Waiter:
    key: _KeyQueue
    deadline: float
    seq: int
    future: asyncio.Future[None]

    def __lt__(self, other: _Waiter) -> bool:  # heap order: earliest deadline, then arrival
        return (self.deadline, self.seq) < (other.deadline, other.seq)


@dataclass(eq=False, slots=True)
class _KeyQueue:
    """One key's waiters in one class, and its place in the class's fair order."""

    key: str
    weight: int
    waiters: list[_Waiter] = field(default_factory=list)  # a heap
    tag: float = 0.0  # virtual start of its next turn (while it has waiters)
    finish: float = 0.0  # virtual end of its last turn


@dataclass(slots=True)
class _Class:
    keys: dict[str, _KeyQueue] = field(default_factory=dict)
    vtime: float = 0.0
    queued: int = 0

    def next_key(self) -> _KeyQueue | None:
        """The busy key whose turn it is; idle keys whose last turn is over are dropped on
        the way (their history no longer matters), so memory is bounded by the busy keys."""
        busy = []
        for name, queue in list(self.keys.items()):
            if queue.waiters:
                busy.append(queue)
            elif queue.finish <= self.vtime:
                del self.keys[name]
        return min(busy, key=lambda k: k.tag) if busy else None


class AdmissionControl:
    """The orchestrator's generation slots (see the module docstring). Safe for any number of
    concurrent callers on one event loop."""

    def __init__(self, settings: Admission) -> None:
        self._settings = settings
        self._running = 0
        self._classes = {p: _Class() for p in Priority}
        self._seq = itertools.count()
        self.shed = 0  # waiters refused to make room for a newcomer

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return sum(c.queued for c in self._classes.values())

    def queued_in(self, priority: Priority) -> int:
        return self._classes[priority].queued

    def _refuse(self, why: str) -> Overloaded:
        return Overloaded(why, self._settings.retry_after_s)

    @asynccontextmanager
    async def slot(
        self, budget_s: float | None = None, identity: Identity | None = None
    ) -> AsyncIterator[None]:
        """Hold one generation slot for the block; raises ``Overloaded`` when none comes in
        time (the queue timeout, or ``budget_s`` if shorter), or when the request is shed.
        ``identity``: whose request it is (its key, priority and weight); None: an anonymous
        caller of normal priority."""
        with tracer().start_as_current_span("tokenrelay.admission") as span:
            span.set_attribute("tokenrelay.queued_before", self.queued)
            if identity is not None:
                span.set_attribute("tokenrelay.priority", identity.priority.name.lower())
            await self._acquire(budget_s, identity)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, budget_s: float | None, identity: Identity | None) -> None:
        settings = self._settings
        if self._running < settings.max_concurrent and not self.queued:
            self._running += 1
            return
        key_id = identity.key_id if identity is not None else ANONYMOUS
        priority = identity.priority if identity is not None else Priority.NORMAL
        weight = identity.weight if identity is not None else 1
        if self.queued >= settings.max_queue and not self._shed_for(priority, key_id):
            raise self._refuse("The service is at capacity; retry later.")
        loop = asyncio.get_running_loop()
        wait = (
            settings.queue_timeout_s
            if budget_s is None
            else min(settings.queue_timeout_s, budget_s)
        )
        waiter = self._enqueue(priority, key_id, weight, loop.time() + max(wait, 0.0))
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await asyncio.shield(waiter.future)
        except (TimeoutError, asyncio.CancelledError) as exc:
            future = waiter.future
            if not future.done():
                future.cancel()
                self._remove(priority, waiter)
            elif not future.cancelled() and future.exception() is None:
                self._release()  # the slot came as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                raise self._refuse(
                    "The service is at capacity and no slot freed up in time; retry later."
                ) from None
            raise

    def _enqueue(self, priority: Priority, key_id: str, weight: int, deadline: float) -> _Waiter:
        cls = self._classes[priority]
        queue = cls.keys.get(key_id)
        if queue is None:
            queue = cls.keys[key_id] = _KeyQueue(key_id, weight)
        queue.weight = weight
        if not queue.waiters:  # the key becomes busy: its turn starts now, or after its last
            queue.tag = max(cls.vtime, queue.finish)
        waiter = _Waiter(
            queue, deadline, next(self._seq), asyncio.get_running_loop().create_future()
        )
        heapq.heappush(queue.waiters, waiter)
        cls.queued += 1
        return waiter

    def _remove(self, priority: Priority, waiter: _Waiter) -> None:
        cls, queue = self._classes[priority], waiter.key
        if waiter in queue.waiters:
            queue.waiters.remove(waiter)
            heapq.heapify(queue.waiters)
            cls.queued -= 1
        self._forget(cls, queue)

    def _forget(self, cls: _Class, queue: _KeyQueue) -> None:
        """Drop an idle key whose history no longer matters (memory stays bounded by the keys
        that are waiting)."""
        if not queue.waiters and queue.finish <= cls.vtime:
            cls.keys.pop(queue.key, None)

    def _shed_for(self, priority: Priority, key_id: str) -> bool:
        """Refuse one waiter to make room for a newcomer of ``priority`` and ``key_id``, if the
        rules allow (see the module docstring); whether one was refused."""
        lowest = next((p for p in Priority if self._classes[p].queued), None)
        if lowest is None or lowest > priority:
            return False
        cls = self._classes[lowest]
        busy = [k for k in cls.keys.values() if k.waiters]
        victim_key = max(busy, key=lambda k: len(k.waiters))
        if lowest == priority:
            own = cls.keys.get(key_id)
            if len(victim_key.waiters) <= (len(own.waiters) if own is not None else 0) + 1:
                return False
        victim = max(victim_key.waiters)  # the latest deadline: it would be served last
        victim.future.set_exception(
            self._refuse("The service is at capacity; a request of higher priority took the slot.")
        )
        self._remove(lowest, victim)
        self.shed += 1
        return True

    def _release(self) -> None:
        for priority in sorted(Priority, reverse=True):
            cls = self._classes[priority]
            queue = cls.next_key()
            if queue is not None:
                waiter = heapq.heappop(queue.waiters)  # those that gave up left the heap
                cls.queued -= 1
                cls.vtime = queue.tag
                queue.finish = queue.tag + 1.0 / queue.weight
                queue.tag = queue.finish
                waiter.future.set_result(None)  # the slot changes hands; the running count stays
                return
        self._running -= 1
