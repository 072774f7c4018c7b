"""Reading a stream ahead of its consumer, so that what piles up can go out together.

Both hops relay a stream whose consumer may fall behind its source: the orchestrator's caller
(a busy loop, a slow edge) behind Triton, the edge's client behind the orchestrator. A
``ReadAhead`` reads the source straight through while the consumer keeps up; once it reads in a
task of its own (from the start, or from the moment ``start`` is called), ``take`` returns
everything that arrived since the last call, so the consumer can send one larger message instead
of a backlog of one per item. Nothing ever waits for company: ``take`` returns as soon as one item
is there.

A source's error reaches the consumer after the items that came before it. ``limit`` bounds what
is held (the reading task then waits, and the source's back-pressure applies); without it the
reader holds at most the rest of one answer.

A consumer that always reads ahead takes it as a generator of batches (``batches``): one step per
batch, instead of a call each to start, take and close.

A consumer may also hold what arrives for a while (``take(hold_until=...)``: the stream
interval), so that items that come close together go out together even when it keeps up; the
source's end (or its last item) ends the hold at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["ReadAhead", "batches"]

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """Reads ``source`` for ``take``. ``arrived`` sees each item as it comes (in the reading
    task when there is one). Not safe for several consumers."""

    def __init__(
        self,
        source: AsyncIterator[T],
        arrived: Callable[[T], None] | None = None,
        limit: int | None = None,
        last: Callable[[T], bool] | None = None,
    ) -> None:
        """``last(item)`` says that no item follows (reading stops there, without waiting for
        the source to end)."""
        self._source = source
        self._arrived = arrived
        self._limit = limit
        self._last = last
        self._pending: list[T] = []
        self._ended: BaseException | None = None  # StopAsyncIteration, or the source's error
        self._waiter: asyncio.Future[None] | None = None  # the consumer waits for an item
        self._room: asyncio.Future[None] | None = None  # the reader waits for room
        self._task: asyncio.Task[None] | None = None
        self._holding = False  # the consumer holds for company: items do not wake it

    @property
    def reading_ahead(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """From now on read in a task (call between ``take``s; again is a no-op). It costs a
        task switch per item, so a consumer that keeps up may never call it."""
        if self._task is None:
            self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for item in self._source:
                if self._arrived is not None:
                    self._arrived(item)
                self._pending.append(item)
                if not self._holding or (
                    self._limit is not None and len(self._pending) >= self._limit
                ):
                    _wake(self._waiter)
                if self._last is not None and self._last(item):
                    break
                while self._limit is not None and len(self._pending) >= self._limit:
                    self._room = asyncio.get_running_loop().create_future()
                    try:
                        await self._room
                    finally:
                        self._room = None
            self._ended = StopAsyncIteration()
        except Exception as exc:  # handed to the consumer, who raises it after what came before
            self._ended = exc
        finally:
            _wake(self._waiter)

    def ready(self) -> list[T]:
        """What has arrived and not been taken (never waits; empty when nothing has)."""
        taken, self._pending = self._pending, []
        if taken:
            _wake(self._room)
        return taken

    async def take(
        self, hold_until: float | None = None, timeout_s: float | None = None
    ) -> list[T]:
        """The next item, or — reading ahead — every item that arrived since the last call (at
        least one). Empty once the source has ended; the source's error is raised instead, after
        the items that came before it. Cancelling a wait leaves the reader running (reading
        ahead) or cancels the source's pending step (reading straight).

        ``hold_until`` (a time of the running loop; reading ahead only): once an item is there,
        wait until then for more, unless the source ends (or its last item comes) first.

        ``timeout_s``: raise ``TimeoutError`` when nothing has arrived that long. Reading ahead,
        nothing is lost (what comes later, a later ``take`` returns), and the timer is armed
        only when there is nothing to take yet: a plain timer, not a cancellation scope (one of
        those per item cost the edge more than its JSON). Reading straight, the timeout cancels
        the source's pending step, as cancelling the wait does."""
        if self._task is None:
            try:
                if timeout_s is None:
                    item = await anext(self._source)
                else:
                    async with asyncio.timeout(timeout_s):
                        item = await anext(self._source)
            except StopAsyncIteration:
                return []
            if self._arrived is not None:
                self._arrived(item)
            return [item]
        if not self._pending and self._ended is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if waiter.result() is _EXPIRED:
                raise TimeoutError
        if hold_until is not None and self._pending and self._ended is None:
            await self._hold(hold_until)
        if self._pending:
            return self.ready()
        if self._ended is None or isinstance(self._ended, StopAsyncIteration):
            return []
        raise self._ended

    async def _hold(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        if until <= loop.time():
            return
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(until, _wake, waiter)
        self._holding = True
        try:
            await waiter
        finally:
            self._holding = False
            self._waiter = None
            timer.cancel()

    async def close(self) -> None:
        """Stop reading ahead (before the source itself is closed). Safe to call again."""
        if self._task is not None:
            self._task.cancel()  # a no-op once it has ended
            await asyncio.gather(self._task, return_exceptions=True)


async def batches(
    source: AsyncIterator[T],
    head: Sequence[T] = (),
    limit: int | None = None,
    idle_s: float | None = None,
) -> AsyncGenerator[list[T], None]:
    """``source`` read ahead from the first step on (a ``ReadAhead`` reading in a task of its
    own), in batches: ``head`` first (items the consumer read already), then every item that
    arrived since the last batch, as soon as there is one — or an empty batch each time
    ``idle_s`` passes without any (the consumer's cue to keep its line alive). Ends when the
    source does; raises the source's error after the items that came before it. Closing it
    stops the reading (the source itself is the consumer's to close)."""
    reader = ReadAhead(source, limit=limit)
    reader.start()
    try:
        if head:
            yield list(head)
        while True:
            try:
                taken = await reader.take(timeout_s=idle_s)
            except TimeoutError:
                yield []
                continue
            if not taken:
                return
            yield taken
    finally:
        await reader.close()


_EXPIRED: Any = object()  # a waiter's result when its timeout came first


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(_EXPIRED)
