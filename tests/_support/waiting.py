"""Waiting for a condition instead of sleeping a fixed time: return as soon as it holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 5.0, step_s: float = 0.02
) -> bool:
    """Whether ``predicate()`` became true within ``timeout_s`` (checked every ``step_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())


async def eventually(
    predicate: Callable[[], object | Awaitable[object]],
    timeout_s: float = 5.0,
    step_s: float = 0.01,
) -> bool:
    """``wait_until`` for async tests; ``predicate`` may be a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value or loop.time() >= deadline:
            return bool(value)
        await asyncio.sleep(step_s)
