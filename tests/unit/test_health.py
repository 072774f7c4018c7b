"""The orchestrator's health Watch: every watcher hears every change, and draining ends them."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from tokenrelay.orchestrator._health import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Context:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.wrote = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self.sent.append(message.status)
        self.wrote.set()


async def _sent(context: _Context, count: int) -> list[Any]:
    while len(context.sent) < count:
        context.wrote.clear()
        await asyncio.wait_for(context.wrote.wait(), 2)
    return context.sent


async def test_a_watcher_that_leaves_does_not_deafen_the_others_and_draining_ends_all() -> None:
    servicer = HealthServicer()
    await servicer.set("svc", SERVING)
    request = health_pb2.HealthCheckRequest(service="svc")
    first, second = _Context(), _Context()
    leaving = asyncio.create_task(servicer.Watch(request, first))
    staying = asyncio.create_task(servicer.Watch(request, second))
    assert await _sent(first, 1) == [SERVING] and await _sent(second, 1) == [SERVING]
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    await servicer.set("svc", NOT_SERVING)
    assert await _sent(second, 2) == [SERVING, NOT_SERVING]
    await servicer.set("svc", SERVING)
    assert await _sent(second, 3) == [SERVING, NOT_SERVING, SERVING]
    await servicer.enter_graceful_shutdown()
    await asyncio.wait_for(staying, 2)  # the stream ends: a drain does not wait for it
    assert second.sent[-1] == NOT_SERVING
