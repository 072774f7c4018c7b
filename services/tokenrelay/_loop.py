"""The event loop the services run on: uvloop when it is installed (and not turned off), else
asyncio's own. Both services spend most of their CPU in the loop's I/O path."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``asyncio.run`` on ``loop``: ``auto`` (uvloop if installed), ``uvloop`` or ``asyncio``."""
    if loop == "asyncio" or (loop == "auto" and importlib.util.find_spec("uvloop") is None):
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
