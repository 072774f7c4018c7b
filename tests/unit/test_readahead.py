"""``ReadAhead.take``'s timeout: the edge's keep-alive wait for the next message. It must raise
when nothing comes in time, lose nothing that comes later, and not fire once items are there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tokenrelay._readahead import ReadAhead


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
