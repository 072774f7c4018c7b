"""``_readahead.batches``: the edge's read-ahead, one generator step per batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from tokenrelay._readahead import batches


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
