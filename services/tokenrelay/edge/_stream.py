"""A streamed answer, from the orchestrator's messages to the client's events: how each endpoint
spells its chunks (``Shape``: ``Chat``, ``Completion``; a choice's pieces put together by
``Piece``, a whole answer by ``Answer``), the pump that writes them (``pump``) to a ``Sink`` — an
SSE response (``SSEWriter``), a resumable stream (``ResumableStream``) or a WebSocket (``_ws``) —
and the resumable streams themselves. One module, so that a token crosses it without leaving it.

Resumable SSE: a streamed chat completion that outlives its connection.

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

Server-Sent Events as OpenAI streams them: ``data: {json}`` events, ``data: [DONE]`` last.

Once the headers are out an error can no longer be a status code: it is an ``event: error`` with
the OpenAI error body, and the stream ends. Idle streams get ``: ping`` comments so proxies and
browsers keep them open.

Choices as OpenAI spells them: what the orchestrator's messages carry for one choice (text,
tool-call pieces, logprobs) put together — into a streamed delta (``Piece``) or a whole answer
(``Answer``) — and written the way each endpoint writes it.

Chat: tool calls as ``message.tool_calls`` (content null when the answer is only calls) and, in
a stream, ``delta.tool_calls`` (a call's first piece with ``id``, ``type`` and
``function.name``, later ones with ``function.arguments`` only); logprobs as
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}``.
Completions: logprobs as ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, the
offsets counted from the start of that choice's text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, Protocol, TypeVar

from aiohttp import web
from opentelemetry import trace

from tokenrelay._readahead import batches
from tokenrelay.config import Resume
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._middlewares import error_body
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, STREAM_LEASE, STREAMS
from tokenrelay.errors import (
    GenerationFailed,
    Gone,
    InvalidRequest,
    PermissionDenied,
    RelayError,
    StreamNotFound,
    UpstreamUnavailable,
)
from tokenrelay.generation import Usage
from tokenrelay.tenancy import ANONYMOUS, current_caller
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.wire import usage_to_pb

__all__ = [
    "HEADERS",
    "Answer",
    "Chat",
    "Completion",
    "Opened",
    "Piece",
    "ResumableStream",
    "ResumableStreams",
    "SSEWriter",
    "Shape",
    "Sink",
    "TextChunk",
    "TextFrames",
    "answer",
    "chat_chunk",
    "chat_completion",
    "chat_logprobs",
    "completion",
    "completion_chunk",
    "continued_json",
    "continued_of",
    "encode",
    "finish_reason",
    "genai_response",
    "new_stream_id",
    "open_answer",
    "owner_id",
    "pump",
    "retrieval_json",
    "tool_call_deltas",
    "total_usage",
    "usage_json",
    "with_continued",
]

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# Stands for the text while a chunk's constant parts are encoded: letters only, so JSON writes it
# as it is.
_SENTINEL = "TokenrelayTextGoesHere"


class TextFrames:
    """The SSE events of one stream's text chunks, whose every part but the text is the same
    for the whole stream (id, created, model, index…): the constant parts are encoded once, and
    each event is them around the text's JSON string, escaped by the very function
    ``json.dumps`` uses (so the bytes are those ``SSEWriter.frame(make(text))`` writes).

    ``make(text)`` is the chunk of ``text``. Should the constant parts themselves hold the
    placeholder (a model named so), every event is encoded whole instead."""

    __slots__ = ("_make", "_prefix", "_suffix")

    def __init__(self, make: Callable[[str], dict[str, Any]]) -> None:
        self._make = make
        parts = SSEWriter.frame(make(_SENTINEL)).split(encode_basestring(_SENTINEL).encode())
        self._prefix, self._suffix = (parts[0], parts[1]) if len(parts) == 2 else (b"", b"")

    def payload(self, text: str) -> dict[str, Any]:
        return self._make(text)

    def frame(self, text: str) -> bytes:
        if not self._prefix:
            return SSEWriter.frame(self._make(text))
        return self._prefix + encode_basestring(text).encode("utf-8") + self._suffix


@dataclass(frozen=True, slots=True)
class TextChunk:
    """A chunk that carries only text, spelt by its stream's ``TextFrames``: a sink writes it as
    the pre-encoded event, or as the chunk (``payload``) where it does not write SSE."""

    frames: TextFrames
    text: str

    def payload(self) -> dict[str, Any]:
        return self.frames.payload(self.text)


class SSEWriter:
    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str]) -> SSEWriter:
        response = web.StreamResponse(status=200, headers={**HEADERS, **headers})
        await response.prepare(request)
        return cls(response)

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    @staticmethod
    def frame(payload: dict[str, Any] | TextChunk) -> bytes:
        """One ``data:`` event, for ``write``."""
        if isinstance(payload, TextChunk):
            return payload.frames.frame(payload.text)
        return b"data: " + encode(payload) + b"\n\n"

    async def write(self, frames: list[bytes]) -> None:
        """Several events in one write (one chunk, one syscall) instead of one write each."""
        if frames:
            await self._response.write(b"".join(frames))

    async def data(self, payload: dict[str, Any]) -> None:
        await self._response.write(self.frame(payload))

    async def error(self, body: dict[str, Any]) -> None:
        await self._response.write(b"event: error\ndata: " + encode(body) + b"\n\n")

    async def fail(self, body: dict[str, Any]) -> None:
        """The error event, then the end of the stream."""
        await self.error(body)
        await self._response.write_eof()

    async def ping(self) -> None:
        await self._response.write(_PING)

    async def done(self) -> None:
        await self._response.write(b"data: [DONE]\n\n")
        await self._response.write_eof()


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Iterable[pb.TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _bytes(e.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                    for t in e.top_logprobs
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: Iterable[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        body["tokens"].append(e.token)
        body["token_logprobs"].append(e.logprob)
        body["top_logprobs"].append({t.token: t.logprob for t in e.top_logprobs})
        body["text_offset"].append(offset)
        offset += len(e.token)
    return body


def tool_call_deltas(pieces: Iterable[pb.ToolCallDelta]) -> list[dict[str, Any]]:
    """Pieces of calls as ``delta.tool_calls``: consecutive pieces of one call merged."""
    out: list[dict[str, Any]] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last is not None and last["index"] == piece.index and not piece.id:
            last["function"]["arguments"] = last["function"].get("arguments", "") + piece.arguments
            continue
        item: dict[str, Any] = {"index": piece.index}
        if piece.id:
            item["id"] = piece.id
            item["type"] = "function"
            item["function"] = {"name": piece.name, "arguments": piece.arguments}
        else:
            item["function"] = {"arguments": piece.arguments}
        out.append(item)
    return out


class Piece:
    """What consecutive messages of one choice carry, to go out as one streamed chunk."""

    def __init__(self) -> None:
        self.index = 0
        self.texts: list[str] = []
        self.calls: list[pb.ToolCallDelta] = []
        self.logprobs: list[pb.TokenLogprob] = []

    def add(self, message: pb.GenerateStreamResponse) -> None:
        if message.text:
            self.texts.append(message.text)
        if message.tool_calls:
            self.calls.extend(message.tool_calls)
        if message.logprobs:
            self.logprobs.extend(message.logprobs)

    def __bool__(self) -> bool:
        return bool(self.texts or self.calls or self.logprobs)

    def take(self) -> tuple[str, list[pb.ToolCallDelta], list[pb.TokenLogprob]]:
        taken = ("".join(self.texts), self.calls, self.logprobs)
        self.texts, self.calls, self.logprobs = [], [], []
        return taken

    @staticmethod
    def chat_delta(text: str, calls: list[pb.ToolCallDelta]) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if text or not calls:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = tool_call_deltas(calls)
        return delta

    @staticmethod
    def completion_logprobs(entries: list[pb.TokenLogprob], offset: int) -> dict[str, Any]:
        return _completion_logprobs(entries, offset)


class Answer:
    """One whole choice, put together from its messages."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.texts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[pb.TokenLogprob] = []
        self.end: pb.StreamEnd | None = None

    def add(self, message: pb.GenerateStreamResponse) -> None:
        self.texts.append(message.text)
        for piece in message.tool_calls:
            call = self.calls.setdefault(
                piece.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = call["id"] or piece.id
            call["function"]["name"] = call["function"]["name"] or piece.name
            call["function"]["arguments"] += piece.arguments
        self.logprobs.extend(message.logprobs)
        if message.HasField("end"):
            self.end = message.end

    def chat(self, finish: str, logprobs: bool) -> dict[str, Any]:
        text = "".join(self.texts)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not self.calls else None,
            "refusal": None,
        }
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {
            "index": self.index,
            "message": message,
            "finish_reason": finish,
            "logprobs": chat_logprobs(self.logprobs) if logprobs else None,
        }

    def completion(self, finish: str, logprobs: bool) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": "".join(self.texts),
            "finish_reason": finish,
            "logprobs": _completion_logprobs(self.logprobs, 0) if logprobs else None,
        }


log = logging.getLogger(__name__)

# A comment line and no blank line after it: once an event had an id (a resumable stream's
# have), the openai SDK's decoder makes an event of every blank line, and an empty one fails its
# JSON parsing (a JSONDecodeError in the client, mid-answer, after any 15 s gap).
_PING = b": ping\n"


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

    The generation's side is a ``Sink`` (``frame``, ``write``, ``ping``, ``fail``,
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
        self._closed = False
        self.task: asyncio.Task[None] | None = None

    # The generation's side (a Sink).

    @staticmethod
    def frame(payload: dict[str, Any] | TextChunk) -> bytes:
        return SSEWriter.frame(payload)

    async def write(self, frames: list[bytes]) -> None:
        if frames:
            await self._emit(frames)

    async def ping(self) -> None:
        async with self._lock:
            await self._send(_PING)

    async def fail(self, body: dict[str, Any]) -> None:
        await self._emit([b"event: error\ndata: " + encode(body) + b"\n\n"], last=True)

    async def done(self) -> None:
        await self._emit([b"data: [DONE]\n\n"], last=True)

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

    async def _emit(self, frames: list[bytes], last: bool = False) -> None:
        async with self._lock:  # numbered under the lock: a client resuming meanwhile gets each
            # event once, in its backlog or after it
            delivered = await self._send(b"".join(self._hold(frame) for frame in frames))
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
            self._stop_grace()  # the grace must not end the stream while its backlog is written
            try:
                await response.prepare(request)
                missed = b"".join(e for number, e in self._events if number > (after or 0))
                if missed:
                    await response.write(missed)
            except BaseException:
                if self._client is None and not self._finished:
                    self._start_grace()
                raise
            if self._closed:  # cancelled (POST .../cancel) while the backlog was written
                await _eof(response)
                return response
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
        if self._closed:
            return
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
        self._closed = True
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
        self.enabled = settings.grace_s > 0  # fixed by the settings: no call to ask
        self._streams: dict[str, ResumableStream] = {}

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


F = TypeVar("F")


class Shape(Protocol):
    """How one endpoint spells its answer (of ``n`` choices)."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def n(self) -> int: ...

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]: ...
    def piece(self, piece: Piece) -> dict[str, Any] | TextChunk: ...
    def end(self, index: int, finish: str) -> dict[str, Any]: ...
    def usage(self, usage: pb.Usage) -> dict[str, Any]: ...
    def whole(self, answers: list[Answer], usage: pb.Usage) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Chat:
    id: str
    created: int
    model: str
    with_usage: bool
    n: int = 1
    logprobs: bool = False
    # Each choice's text chunks, pre-encoded (a chunk that carries only text is the same but
    # for its text for the whole stream).
    texts: dict[int, TextFrames] = field(default_factory=dict)

    def _chunk(self, delta: dict[str, Any], index: int = 0, **fields: Any) -> dict[str, Any]:
        return chat_chunk(
            self.id, self.created, self.model, delta, None, self.with_usage, index, **fields
        )

    def _text(self, index: int, text: str) -> TextChunk:
        frames = self.texts.get(index)
        if frames is None:
            frames = self.texts[index] = TextFrames(
                lambda t: self._chunk(Piece.chat_delta(t, []), index, logprobs=None)
            )
        return TextChunk(frames, text)

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]:
        chunks = [self._chunk({"role": "assistant", "content": ""}, i) for i in range(self.n)]
        if retrieval is not None:
            chunks[0]["retrieval"] = retrieval
        return chunks

    def piece(self, piece: Piece) -> dict[str, Any] | TextChunk:
        index = piece.index
        text, calls, logprobs = piece.take()
        if not calls and not self.logprobs:
            return self._text(index, text)
        entries = chat_logprobs(logprobs) if self.logprobs else None
        return self._chunk(Piece.chat_delta(text, calls), index, logprobs=entries)

    def end(self, index: int, finish: str) -> dict[str, Any]:
        return chat_chunk(self.id, self.created, self.model, {}, finish, self.with_usage, index)

    def usage(self, usage: pb.Usage) -> dict[str, Any]:
        chunk = chat_chunk(self.id, self.created, self.model, {}, None, True)
        chunk["choices"] = []
        chunk["usage"] = usage_json(usage)
        return chunk

    def whole(self, answers: list[Answer], usage: pb.Usage) -> dict[str, Any]:
        choices = [a.chat(_finish(a.end), self.logprobs) for a in answers]
        return chat_completion(self.id, self.created, self.model, choices, usage)


@dataclass(frozen=True, slots=True)
class Completion:
    id: str
    created: int
    model: str
    with_usage: bool
    n: int = 1
    logprobs: bool = False
    # Characters of each choice's text so far: logprobs' text_offset counts from its start.
    offsets: dict[int, int] = field(default_factory=dict)
    texts: dict[int, TextFrames] = field(default_factory=dict)  # as Chat's

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]:
        if retrieval is None:
            return []
        chunk = completion_chunk(self.id, self.created, self.model, "", None)
        chunk["retrieval"] = retrieval
        return [chunk]

    def piece(self, piece: Piece) -> dict[str, Any] | TextChunk:
        index = piece.index
        text, _, logprobs = piece.take()
        if not self.logprobs:
            frames = self.texts.get(index)
            if frames is None:
                frames = self.texts[index] = TextFrames(
                    lambda t: completion_chunk(self.id, self.created, self.model, t, None, index)
                )
            return TextChunk(frames, text)
        entries = None
        if self.logprobs:
            offset = self.offsets.get(index, 0)
            entries = Piece.completion_logprobs(logprobs, offset)
            self.offsets[index] = offset + len(text)  # the next piece starts after its text
        return completion_chunk(self.id, self.created, self.model, text, None, index, entries)

    def end(self, index: int, finish: str) -> dict[str, Any]:
        return completion_chunk(self.id, self.created, self.model, "", finish, index)

    def usage(self, usage: pb.Usage) -> dict[str, Any]:
        return completion(self.id, self.created, self.model, [], usage)

    def whole(self, answers: list[Answer], usage: pb.Usage) -> dict[str, Any]:
        choices = [a.completion(_finish(a.end), self.logprobs) for a in answers]
        return completion(self.id, self.created, self.model, choices, usage)


def genai_response(model: str, ends: list[pb.StreamEnd], usage: pb.Usage) -> dict[str, Any]:
    return {
        "gen_ai.response.model": model,
        "gen_ai.response.finish_reasons": [finish_reason(e) or "cancelled" for e in ends],
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
    }


def _finish(end: pb.StreamEnd | None) -> str:
    finish = finish_reason(end) if end is not None else None
    if finish is None:
        raise UpstreamUnavailable("The inference server cancelled the generation.")
    return finish


def total_usage(ends: list[pb.StreamEnd]) -> pb.Usage:
    """The request's usage: the prompt once, every choice's completion tokens, and the prompts
    of every continuation (each in its own choice's end only)."""
    if not ends:
        return pb.Usage()
    first = ends[0]
    prompt = first.usage.prompt_tokens - first.continued.usage.prompt_tokens
    prompt += sum(e.continued.usage.prompt_tokens for e in ends)
    return usage_to_pb(Usage(prompt, sum(e.usage.completion_tokens for e in ends)))


class Sink(Protocol[F]):
    """Where a streamed answer's events go, in order: an SSE response (``SSEWriter``), a
    resumable stream that outlives its connection (``ResumableStream``), or one
    generation's messages on a WebSocket (``_ws``). ``frame`` spells one chunk; ``write`` sends
    several at once."""

    def frame(self, payload: dict[str, Any] | TextChunk) -> F: ...
    async def write(self, frames: list[F]) -> None: ...
    async def ping(self) -> None: ...
    async def fail(self, body: dict[str, Any]) -> None:
        """The error (an OpenAI error body), then the end."""
        ...

    async def done(self) -> None: ...


def continued_of(ends: list[pb.StreamEnd]) -> pb.Continued | None:
    """How the answer outlived its nodes, over all its choices (None: it did not)."""
    continued = [e.continued for e in ends if e.HasField("continued")]
    if not continued:
        return None
    prompt = sum(c.usage.prompt_tokens for c in continued)
    completion = sum(c.usage.completion_tokens for c in continued)
    return pb.Continued(
        count=sum(c.count for c in continued), usage=usage_to_pb(Usage(prompt, completion))
    )


def with_continued(chunk: dict[str, Any], continued: pb.Continued | None) -> dict[str, Any]:
    """``chunk`` with the ``continued`` extension when the answer outlived its node."""
    if continued is not None:
        chunk["continued"] = continued_json(continued)
    return chunk


async def pump(
    sink: Sink[F],
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: Shape,
    first: pb.GenerateStreamResponse,
    include_usage: bool,
    retrieval: dict[str, Any] | None,
    keepalive_s: float,
) -> None:
    """The orchestrator's ``messages`` (``first`` already read) as ``shape``'s chunks into
    ``sink``, then its end (``done``), or the error that ended them (``fail``: the usage so far
    first, when asked for). Does not close ``messages``."""
    # The orchestrator's messages are read ahead (a bounded few: a slow client still slows the
    # reading), so that messages that arrive together go out as one event, in one write; nothing
    # waits for company, so the first token is never delayed (when the client or the loop is
    # slower than the model, several deltas pile up and cost one event instead of one each).
    # Consecutive messages of one choice merge; a message of another choice starts a new event.
    frames = [sink.frame(chunk) for chunk in shape.opening(retrieval)]
    piece = Piece()
    ends: list[pb.StreamEnd] = []

    def flush() -> None:
        if piece:
            frames.append(sink.frame(shape.piece(piece)))

    arriving = batches(messages, head=(first,), limit=32, idle_s=keepalive_s)
    try:
        async with aclosing(arriving):
            async for batch in arriving:
                if not batch:  # none for keepalive_s
                    await sink.ping()
                    continue
                for message in batch:
                    if message.index != piece.index:
                        flush()
                        piece.index = message.index
                    piece.add(message)
                    if message.HasField("end"):
                        flush()
                        end = message.end
                        ends.append(end)
                        chunk = shape.end(message.index, _finish(end))
                        frames.append(sink.frame(with_continued(chunk, continued_of([end]))))
                        if len(ends) == shape.n:
                            break
                if len(ends) == shape.n:
                    usage = total_usage(ends)
                    span = trace.get_current_span()
                    span.set_attributes(genai_response(shape.model, ends, usage))
                    if include_usage:
                        chunk = with_continued(shape.usage(usage), continued_of(ends))
                        frames.append(sink.frame(chunk))
                    await sink.write(frames)
                    break
                flush()
                await sink.write(frames)
                frames = []
            else:
                raise GenerationFailed("The answer ended unexpectedly.")
    except RelayError as exc:
        flush()
        if include_usage and exc.usage is not None:  # what was generated before the error
            frames.append(sink.frame(shape.usage(usage_to_pb(exc.usage))))
        await sink.write(frames)
        await sink.fail(error_body(exc))
        return
    await sink.done()


_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


def retrieval_json(report: rpb.RetrievalReport) -> dict[str, Any]:
    """The ``retrieval`` object of an answer: status, citations (and why it failed)."""
    body: dict[str, Any] = {
        "status": _STATUSES.get(report.status, "failed"),
        "citations": [
            {
                "number": c.number,
                "chunk_id": c.chunk_id,
                "document_id": c.document_id,
                "source": c.source,
                "index": c.index,
                "score": round(c.score, 6),
            }
            for c in report.citations
        ],
    }
    if report.message:
        body["message"] = report.message
    return body


def continued_json(continued: pb.Continued) -> dict[str, Any]:
    """The ``continued`` extension of an answer that outlived its node: how many times it was
    continued on another node, and the tokens the continuations took (in the usage already)."""
    return {"count": continued.count, "usage": usage_json(continued.usage)}


def finish_reason(end: pb.StreamEnd) -> str | None:
    """The OpenAI finish reason, or None for a generation the inference server cancelled."""
    return _FINISH.get(end.finish_reason)


def usage_json(value: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.total_tokens,
    }


def chat_completion(
    id_: str, created: int, model: str, choices: list[dict[str, Any]], use: pb.Usage
) -> dict[str, Any]:
    """A chat completion of ``choices`` (see ``_stream.Answer.chat``)."""
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(use),
    }


def chat_chunk(
    id_: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    with_usage: bool = False,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion(
    id_: str, created: int, model: str, choices: list[dict[str, Any]], use: pb.Usage | None
) -> dict[str, Any]:
    """A text completion of ``choices``; also each chunk of a streamed one (one choice, whose
    ``finish_reason`` is None until its last)."""
    body: dict[str, Any] = {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = usage_json(use)
    return body


def completion_chunk(
    id_: str,
    created: int,
    model: str,
    text: str,
    finish: str | None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
    return completion(id_, created, model, [choice], None)


async def _next(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
) -> pb.GenerateStreamResponse:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        raise GenerationFailed("The answer ended unexpectedly.") from None


async def _sse(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: Shape,
    first: pb.GenerateStreamResponse,
    headers: dict[str, str],
    include_usage: bool,
    retrieval: dict[str, Any] | None,
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    sse = await SSEWriter.open(request, headers)
    streams = request.app[METRICS].streams
    streams.inc()
    try:
        await pump(
            sse, messages, shape, first, include_usage, retrieval, settings.keepalive_interval_s
        )
    except ConnectionError:
        raise  # the client left (the error middleware tells that from a failure)
    except Exception:  # the headers are out: the error middleware's 500 would corrupt the body
        log.exception("stream failed")
        with suppress(ConnectionError, RuntimeError):
            await sse.fail(error_body(RelayError("Internal error.")))
    finally:
        streams.dec()
    return sse.response


@dataclass(frozen=True, slots=True)
class Opened:
    """A generation whose first message has come: how its answer is spelt, that message, the
    response headers its start asks for, and its retrieval report."""

    shape: Shape
    first: pb.GenerateStreamResponse
    headers: dict[str, str]
    retrieval: dict[str, Any] | None


async def open_answer(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    parsed: oa.ParsedRequest,
    chat: bool,
    request_id: str,
) -> Opened:
    """Wait for the orchestrator's first message and make the answer's shape from it. Raises
    the ``RelayError`` that came instead (nothing has gone to the client yet)."""
    first = await _next(messages)
    model = first.start.served_by.model or parsed.request.model
    kind = Chat if chat else Completion
    # A chat completion's id is random: it is what a client resumes its stream by.
    answer_id = new_stream_id(request_id) if chat else "cmpl-" + request_id
    shape = kind(
        answer_id, int(time.time()), model, parsed.include_usage, parsed.n, parsed.logprobs
    )
    headers = {}
    if first.start.served_by.fallback:
        headers["x-tokenrelay-fallback"] = model
    retrieval = None
    if first.start.HasField("retrieval"):
        retrieval = retrieval_json(first.start.retrieval)
        headers["x-tokenrelay-retrieval"] = retrieval["status"]
    return Opened(shape, first, headers, retrieval)


def owner_id() -> str:
    """The key id of the caller being served (``anonymous`` without keys)."""
    caller = current_caller.get()
    return caller.key_id if caller is not None else ANONYMOUS


async def _resumable(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: Shape,
    first: pb.GenerateStreamResponse,
    headers: dict[str, str],
    include_usage: bool,
    retrieval: dict[str, Any] | None,
) -> web.StreamResponse:
    """A streamed answer that outlives this connection (``_stream.ResumableStream``): the
    generation runs in a task of its own, which owns ``messages`` from here on; this connection
    is its first client."""
    settings = request.app[SETTINGS]
    gauge = request.app[METRICS].streams
    # The key's stream lease lasts as long as the generation, which outlives this connection:
    # a client that drops and asks again must not run more than its max_streams at once.
    lease = request.get(STREAM_LEASE)
    request[STREAM_LEASE] = None

    async def generate(stream: ResumableStream) -> None:
        gauge.inc()
        try:
            await pump(
                stream,
                messages,
                shape,
                first,
                include_usage,
                retrieval,
                settings.keepalive_interval_s,
            )
        except Exception:  # a bug here must still end the stream for its clients
            log.exception("resumable stream failed")
            await stream.fail(error_body(RelayError("Internal error.")))
        finally:
            gauge.dec()
            try:
                await messages.aclose()
            finally:
                if lease is not None:
                    await lease.release()

    owner = owner_id()
    stream = request.app[STREAMS].start(shape.id, owner, headers, generate)
    return await stream.serve(request, owner, None)


async def answer(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    parsed: oa.ParsedRequest,
    chat: bool,
) -> web.StreamResponse:
    """The answer to ``parsed`` from the orchestrator's ``messages``, which it owns from here on
    (it closes them, or hands them to a resumable stream): streamed — as SSE, resumable for a
    chat completion when resuming is on — or whole. Raises the ``RelayError`` that came instead
    of the first message (nothing has gone to the client yet)."""
    handed_over = False
    try:
        opened = await open_answer(messages, parsed, chat, request[REQUEST_ID])
        shape, first, headers, retrieval = (
            opened.shape,
            opened.first,
            opened.headers,
            opened.retrieval,
        )
        model = shape.model
        if parsed.stream and chat and request.app[STREAMS].enabled:
            handed_over = True
            return await _resumable(
                request, messages, shape, first, headers, parsed.include_usage, retrieval
            )
        if parsed.stream:
            return await _sse(
                request, messages, shape, first, headers, parsed.include_usage, retrieval
            )
        answers: dict[int, Answer] = {}
        ends: list[pb.StreamEnd] = []
        message = first
        while True:
            answers.setdefault(message.index, Answer(message.index)).add(message)
            if message.HasField("end"):
                ends.append(message.end)
                if len(ends) == parsed.n:
                    break
            message = await _next(messages)
        usage = total_usage(ends)
        whole = shape.whole([answers[i] for i in sorted(answers)], usage)
        if retrieval is not None:
            whole["retrieval"] = retrieval
        continued = continued_of(ends)
        if continued is not None:
            with_continued(whole, continued)
            headers["x-tokenrelay-continued"] = str(continued.count)
        trace.get_current_span().set_attributes(genai_response(model, ends, usage))
        return web.json_response(whole, headers=headers)
    finally:
        if not handed_over:
            await messages.aclose()


_STATUSES = {
    rpb.RETRIEVAL_STATUS_USED: "used",
    rpb.RETRIEVAL_STATUS_EMPTY: "empty",
    rpb.RETRIEVAL_STATUS_FAILED: "failed",
}
