"""Server-Sent Events as OpenAI streams them: ``data: {json}`` events, ``data: [DONE]`` last.

Once the headers are out an error can no longer be a status code: it is an ``event: error`` with
the OpenAI error body, and the stream ends. Idle streams get ``: ping`` comments so proxies and
browsers keep them open.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

from aiohttp import web

__all__ = ["HEADERS", "SSEWriter", "TextChunk", "TextFrames", "encode"]

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
        await self._response.write(b": ping\n\n")

    async def done(self) -> None:
        await self._response.write(b"data: [DONE]\n\n")
        await self._response.write_eof()
