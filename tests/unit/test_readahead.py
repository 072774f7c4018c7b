"""``_readahead.batches``: the edge's read-ahead, one generator step per batch; and
``ReadAhead.take``'s timeout, which its keep-alive waits with: it must raise when nothing comes in
time, lose nothing that comes later, and not fire once items are there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from tokenrelay._readahead import ReadAhead, batches


class _Source:
    """Yields what is put in ``items``; raises an exception put there; ends on None."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[object] = asyncio.Queue()
        self.read = 0

    async def stream(self) -> AsyncIterator[object]:
        while True:
            item = await self.items.get()
            self.items.task_done()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            self.read += 1
            yield item


async def test_head_first_then_what_piled_up_as_one_batch_then_the_end() -> None:
    source = _Source()
    async with aclosing(batches(source.stream(), head=("h",))) as arriving:
        assert await anext(arriving) == ["h"]
        for item in ("a", "b", "c"):
            source.items.put_nowait(item)
        await source.items.join()  # the reader reads on while the consumer is busy
        assert await anext(arriving) == ["a", "b", "c"]
        source.items.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await anext(arriving)


async def test_an_idle_source_gives_empty_batches_and_the_reader_goes_on() -> None:
    source = _Source()
    async with aclosing(batches(source.stream(), idle_s=0.01)) as arriving:
        assert await anext(arriving) == []
        assert await anext(arriving) == []
        source.items.put_nowait("late")
        assert await anext(arriving) == ["late"]


async def test_the_sources_error_comes_after_the_items_before_it() -> None:
    source = _Source()
    source.items.put_nowait("a")
    source.items.put_nowait(ValueError("broken"))
    async with aclosing(batches(source.stream())) as arriving:
        assert await anext(arriving) == ["a"]
        with pytest.raises(ValueError, match="broken"):
            await anext(arriving)


async def test_closing_stops_the_reading_but_not_the_source() -> None:
    source = _Source()
    stream = source.stream()
    arriving = batches(stream, head=("h",))
    assert await anext(arriving) == ["h"]
    await arriving.aclose()
    source.items.put_nowait("after")
    await asyncio.sleep(0)
    assert source.read == 0  # nothing reads it any more
    assert await anext(stream) == "after"  # the consumer's to close
    await stream.aclose()


async def _source(queue: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (item := await queue.get()) is not None:
        yield item


async def test_nothing_in_time_raises_and_what_comes_later_is_taken() -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    reader = ReadAhead(_source(queue))
    reader.start()
    with pytest.raises(TimeoutError):
        await reader.take(timeout_s=0.02)
    await queue.put("a")
    await queue.put("b")
    await asyncio.sleep(0.01)
    assert await reader.take(timeout_s=0.02) == ["a", "b"]
    await queue.put(None)
    assert await reader.take(timeout_s=0.02) == []
    await reader.close()


async def test_reading_straight_the_timeout_applies_too() -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    reader = ReadAhead(_source(queue))
    queue.put_nowait("a")
    assert await reader.take(timeout_s=0.02) == ["a"]
    with pytest.raises(TimeoutError):
        await reader.take(timeout_s=0.02)


async def test_an_item_that_comes_in_time_is_taken_and_the_timer_is_gone() -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    reader = ReadAhead(_source(queue))
    reader.start()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, queue.put_nowait, "x")
    assert await reader.take(timeout_s=0.2) == ["x"]
    # The timer of that take was cancelled: waiting past it raises only this take's timeout.
    loop.call_later(0.3, queue.put_nowait, "y")
    assert await reader.take(timeout_s=1.0) == ["y"]
    await queue.put(None)
    await reader.close()


async def test_the_sources_error_comes_after_its_items() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "a"
        raise ValueError("broken")

    reader = ReadAhead(failing())
    reader.start()
    await asyncio.sleep(0.01)
    assert await reader.take(timeout_s=0.05) == ["a"]
    with pytest.raises(ValueError, match="broken"):
        await reader.take(timeout_s=0.05)
    await reader.close()
