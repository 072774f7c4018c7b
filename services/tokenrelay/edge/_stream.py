"""Resumable SSE: a streamed chat completion that outlives its connection.

A browser whose connection blips should not lose its answer. So a streamed chat completion's
generation does not belong to the connection that asked for it: it runs in a task of its own
(``ResumableStream``), which writes its events — each with an ``id:``, its number in the stream —
into a bounded replay buffer and to the client attached at the time, if any. When the client
goes away the generation goes on, for ``[edge.resume] grace_s``; a client that reopens the
stream in that time with ``GET /v1/chat/completions/{id}/stream`` (the ``chatcmpl-…`` id of its
chunks) and ``Last-Event-ID`` (the last event it got; a browser's ``EventSource`` sends it by
itself when it reconnects) receives the events it missed and then the rest as they come. A
stream nobody resumes in time is cancelled (the gRPC call, hence the Triton request), as a
dropped stream always was; a finished one is forgotten once its end reached a client, or after
the grace period. A client that is done with a stream (a Stop button) says so with ``POST
/v1/chat/completions/{id}/cancel``, which cancels it at once, as OpenAI's background responses
are cancelled.

Bounds: the replay buffer keeps each stream's most recent events up to ``buffer_bytes`` (a
resume from an event older than that gets 410); ids are random (128 bits: not guessable); only
the API key that started a stream may resume it (another gets 403); an unknown or forgotten id
gets 404. A new connection takes a stream over from an older one still attached (a client that
reconnects before the server noticed its old connection was gone); the older one ends.

Several edge replicas: the stream lives in the replica that serves it, so a resume must reach
the same replica — route ``/v1/chat/completions/{id}/stream`` by the id (or by the client's
session) to the replica that answered the POST; see the README.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from tokenrelay.config import Resume
from tokenrelay.edge._sse import HEADERS, SSEWriter, encode
from tokenrelay.errors import Gone, InvalidRequest, PermissionDenied, StreamNotFound

__all__ = ["ResumableStream", "ResumableStreams", "new_stream_id"]

log = logging.getLogger(__name__)

_PING = b": ping\n\n"


def new_stream_id(request_id: str) -> str:
    """A chat completion's id: ``chatcmpl-``, the request's id (so that logs and answers meet),
    and 128 random bits (the id is, with the API key, what resumes the stream: a request id may
    be the client's own, and guessable)."""
    return f"chatcmpl-{request_id}-{secrets.token_urlsafe(16)}"


def _last_event_id(request: web.Request) -> int | None:
    """The ``Last-Event-ID`` header (or the ``last_event_id`` query parameter, for clients that
    cannot set headers) as a number; None when there is none. Raises ``InvalidRequest``."""
    given = request.headers.get("Last-Event-ID", request.query.get("last_event_id", "")).strip()
    if not given:
        return None
    if not given.isdigit() or len(given) > 12:
        raise InvalidRequest("Last-Event-ID must be the id of an event of this stream.", "id")
    return int(given)


class _Client:
    """One attached connection; ``ended`` is set when it has nothing more to wait for."""

    __slots__ = ("ended", "request", "response")

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.ended = asyncio.Event()

    def drop(self) -> None:
        """End this connection now: a write blocked on it (a peer that vanished without closing
        its side) fails at once instead of holding the stream until TCP gives up."""
        self.ended.set()
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class ResumableStream:
    """One streamed chat completion, resumable for its grace period.

    The generation's side is a ``_generate.Sink`` (``frame``, ``write``, ``ping``, ``fail``,
    ``done``), written by the task the registry runs; the clients' side is ``serve``. Events
    are numbered from 1 in the order they were written; pings are not events."""

    def __init__(
        self,
        stream_id: str,
        owner: str,
        headers: dict[str, str],
        settings: Resume,
        forget: Callable[[ResumableStream], None],
    ) -> None:
        self.id = stream_id
        self.owner = owner
        self._headers = headers
        self._settings = settings
        self._forget = forget
        self._events: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._last = 0  # the id of the last event written
        self._first_held = 1  # the id of the oldest event still in the buffer
        self._lock = asyncio.Lock()  # one writer to the attached client at a time
        self._client: _Client | None = None
        self._finished = False
        self._timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # The generation's side (a Sink).

    @staticmethod
    def frame(payload: dict[str, Any]) -> bytes:
        return SSEWriter.frame(payload)

    async def write(self, frames: list[bytes]) -> None:
        if frames:
            await self._emit(b"".join(self._hold(frame) for frame in frames))

    async def ping(self) -> None:
        async with self._lock:
            await self._send(_PING)

    async def fail(self, body: dict[str, Any]) -> None:
        await self._emit(self._hold(b"event: error\ndata: " + encode(body) + b"\n\n"), last=True)

    async def done(self) -> None:
        await self._emit(self._hold(b"data: [DONE]\n\n"), last=True)

    def _hold(self, frame: bytes) -> bytes:
        """``frame`` as the next event (its id first), kept in the replay buffer, whose oldest
        events leave when it holds more than its cap."""
        self._last += 1
        event = b"id: %d\n" % self._last + frame
        self._events.append((self._last, event))
        self._bytes += len(event)
        while self._bytes > self._settings.buffer_bytes and len(self._events) > 1:
            _, dropped = self._events.popleft()
            self._bytes -= len(dropped)
            self._first_held = self._events[0][0]
        return event

    async def _emit(self, data: bytes, last: bool = False) -> None:
        async with self._lock:
            delivered = await self._send(data)
            if not last:
                return
            self._finished = True
            client, self._client = self._client, None
            if client is not None:
                if delivered:
                    delivered = await _eof(client.response)
                client.ended.set()
            if delivered:  # the end reached a client: nobody needs the buffer any more
                self._close()
            elif self._timer is None:
                self._start_grace()

    async def _send(self, data: bytes) -> bool:
        """Write to the attached client, if any; whether it got it. A client that cannot be
        written to is detached (the generation goes on for its grace period)."""
        client = self._client
        if client is None:
            return False
        try:
            await client.response.write(data)
        except (ConnectionError, RuntimeError):  # gone (aiohttp's reset is a ConnectionError)
            self._detach(client)
            return False
        return True

    # The clients' side.

    def check_owner(self, owner: str) -> None:
        """Raise ``PermissionDenied`` unless ``owner`` (a key id) started this stream."""
        if owner != self.owner:
            raise PermissionDenied("This stream belongs to another API key.")

    def check(self, owner: str, after: int | None) -> None:
        """Raise why a client of ``owner`` may not resume after event ``after`` (None: from the
        start): ``PermissionDenied`` for another key, ``InvalidRequest`` for an id this stream
        never had, ``Gone`` for events the buffer no longer holds."""
        self.check_owner(owner)
        if after is not None and after > self._last:
            raise InvalidRequest(
                f"Last-Event-ID {after} is not an event of this stream (it has {self._last}).",
                "id",
            )
        if (after or 0) + 1 < self._first_held:
            raise Gone(
                f"The events after {after or 0} are no longer held (the stream's replay buffer"
                f" keeps its last {self._settings.buffer_bytes} bytes); start a new request.",
                "id",
                code="stream_events_dropped",
            )

    async def serve(
        self, request: web.Request, owner: str, after: int | None
    ) -> web.StreamResponse:
        """This stream for one connection: the events after ``after`` (None: all), then the
        rest as they come, until the stream ends or another connection takes it over. Raises
        (before any header goes out) as ``check`` does."""
        response = web.StreamResponse(status=200, headers={**HEADERS, **self._headers})
        client = _Client(request, response)
        self.check(owner, after)
        if self._client is not None:  # taken over: the older connection ends, now
            self._client.drop()
        async with self._lock:
            self.check(owner, after)
            await response.prepare(request)
            missed = b"".join(event for number, event in self._events if number > (after or 0))
            if missed:
                await response.write(missed)
            if self._finished:
                await _eof(response)
                self._close()
                return response
            if self._client is not None:  # attached while we waited for the lock
                self._client.drop()
            self._client = client
            self._stop_grace()
        try:
            await client.ended.wait()
        finally:
            self._detach(client)
        return response

    def _detach(self, client: _Client) -> None:
        if self._client is client:
            self._client = None
            if not self._finished:
                log.info("stream detached", extra={"fields": {"event": self._last}})
                self._start_grace()
        client.ended.set()

    def _start_grace(self) -> None:
        self._stop_grace()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._settings.grace_s, self._expire)

    def _stop_grace(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._client is not None:
            return
        if not self._finished:
            log.info("stream not resumed in time: cancelled")
        self._close()

    def _close(self) -> None:
        """Forget the stream; a generation still running is cancelled (at Triton too), and a
        client still attached ends."""
        self._stop_grace()
        client, self._client = self._client, None
        if client is not None:
            client.ended.set()
        self._events.clear()
        self._bytes = 0
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._forget(self)


async def _eof(response: web.StreamResponse) -> bool:
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        return False
    return True


class ResumableStreams:
    """The edge's resumable streams, by id. Its ``close`` cancels every generation left."""

    def __init__(self, settings: Resume) -> None:
        self.settings = settings
        self._streams: dict[str, ResumableStream] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.grace_s > 0

    def __len__(self) -> int:
        return len(self._streams)

    def start(
        self,
        stream_id: str,
        owner: str,
        headers: dict[str, str],
        generate: Callable[[ResumableStream], Coroutine[Any, Any, None]],
    ) -> ResumableStream:
        """A new stream whose events ``generate`` writes, run in a task of its own (it keeps
        the caller's context: its identity and trace)."""
        stream = ResumableStream(stream_id, owner, headers, self.settings, self._forget)
        self._streams[stream_id] = stream
        stream.task = asyncio.create_task(generate(stream), name=f"stream {stream_id}")
        return stream

    def _forget(self, stream: ResumableStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    async def resume(self, request: web.Request, stream_id: str, owner: str) -> web.StreamResponse:
        """``GET /v1/chat/completions/{id}/stream``. Raises ``StreamNotFound`` for an id it does
        not hold, and as ``ResumableStream.check`` does."""
        after = _last_event_id(request)
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFound(stream_id)
        log.info("stream resumed", extra={"fields": {"after": after}})
        return await stream.serve(request, owner, after)

    def cancel(self, stream_id: str, owner: str) -> None:
        """``POST /v1/chat/completions/{id}/cancel``: stop the generation now (a client that
        is done with it, as opposed to one whose connection dropped). Raises as ``resume``."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFound(stream_id)
        stream.check_owner(owner)
        log.info("stream cancelled by its client")
        stream._close()

    async def close(self) -> None:
        """Cancel every generation still running and forget every stream."""
        streams = list(self._streams.values())
        tasks = [s.task for s in streams if s.task is not None]
        for stream in streams:
            stream._close()
        await asyncio.gather(*tasks, return_exceptions=True)
