"""What every endpoint reads from a request: its JSON body, and the client's time budget."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tokenrelay.config import EdgeSettings
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._state import SETTINGS

__all__ = ["budget", "read_json"]


def budget(request: web.Request, settings: EdgeSettings) -> float:
    """The request's deadline in seconds: the OpenAI SDK's ``x-stainless-timeout`` where given,
    else (and at most) the configured request timeout."""
    try:
        stated = float(request.headers.get("x-stainless-timeout", "inf"))
    except ValueError:
        stated = float("inf")
    return stated if 0 < stated < settings.request_timeout_s else settings.request_timeout_s


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 408 when it does not arrive within ``body_timeout_s``."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    return oa.loads(raw)
