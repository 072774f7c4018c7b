"""Server-Sent Events as OpenAI streams them: ``data: {json}`` events, ``data: [DONE]`` last.

Once the headers are out an error can no longer be a status code: it is an ``event: error`` with
the OpenAI error body, and the stream ends. Idle streams get ``: ping`` comments so proxies and
browsers keep them open.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

__all__ = ["HEADERS", "SSEWriter", "encode"]

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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
    def frame(payload: dict[str, Any]) -> bytes:
        """One ``data:`` event, for ``write``."""
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
