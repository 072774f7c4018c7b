"""A resumable stream (``edge._stream.ResumableStream``) between its generation and clients whose
writes are scripted: a client resuming while another's write hangs, or while the grace ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenrelay.config import Resume
from tokenrelay.edge import _stream
from tokenrelay.edge._stream import ResumableStream


class _Response:
    """A client's response: its writes wait on ``block`` (a peer gone: until aborted), or take
    ``delay_s`` each."""

    def __init__(self, block: asyncio.Future[None] | None = None, delay_s: float = 0.0) -> None:
        self.block, self.delay_s = block, delay_s
        self.got: list[bytes] = []
        self.eof = False

    def abort(self) -> None:
        if self.block is not None and not self.block.done():
            self.block.set_exception(ConnectionResetError())

    async def prepare(self, request: Any) -> None:
        pass

    async def write(self, data: bytes) -> None:
        if self.block is not None:
            await self.block
        await asyncio.sleep(self.delay_s)
        self.got.append(data)

    async def write_eof(self) -> None:
        self.eof = True


class _Request:
    def __init__(self, response: _Response) -> None:
        self.transport = self  # what _Client.drop aborts
        self._response = response

    def abort(self) -> None:
        self._response.abort()


def _ids(response: _Response) -> list[int]:
    text = b"".join(response.got).decode()
    return [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]


def _serve_to(
    monkeypatch: pytest.MonkeyPatch, stream: ResumableStream, response: _Response
) -> asyncio.Task[Any]:
    monkeypatch.setattr(_stream.web, "StreamResponse", lambda status, headers: response)
    return asyncio.create_task(stream.serve(_Request(response), "anon", None))  # type: ignore[arg-type]


async def test_a_client_resuming_while_anothers_write_hangs_gets_each_event_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = ResumableStream("s", "anon", {}, Resume(grace_s=5), lambda _: None)
    stale = _Response(block=asyncio.get_running_loop().create_future())
    stream._client = _stream._Client(_Request(stale), stale)  # type: ignore[arg-type]

    async def generation() -> None:
        for i in range(1, 4):  # the next batch already read: no pause between writes
            await stream.write([b"data: %d\n\n" % i])

    writing = asyncio.create_task(generation())
    await asyncio.sleep(0.01)  # the first write waits on the stale client
    fresh = _Response()
    serving = _serve_to(monkeypatch, stream, fresh)  # takes over: the stale one is aborted
    await asyncio.wait_for(writing, 5)
    assert _ids(fresh) == [1, 2, 3]
    serving.cancel()


async def test_a_client_resuming_as_the_grace_ends_is_served_and_the_stream_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forgotten: list[ResumableStream] = []
    stream = ResumableStream("s", "anon", {}, Resume(grace_s=0.2), forgotten.append)
    await stream.write([b"data: 1\n\n"])  # nobody attached
    stream._start_grace()  # as when its first client left
    await asyncio.sleep(0.1)
    slow = _Response(delay_s=0.3)  # its backlog's write outlasts the grace
    serving = _serve_to(monkeypatch, stream, slow)
    await asyncio.sleep(0.5)
    assert not forgotten  # attached in time: the grace no longer ends it
    await stream.write([b"data: 2\n\n"])
    await stream.done()
    await asyncio.wait_for(serving, 5)
    assert _ids(slow) == [1, 2, 3] and slow.eof
