"""The orchestrator's ``grpc.health.v1`` service: grpc's own, with a ``Watch`` that suits the
edge's readiness watch.

grpc_health's ``Watch`` never ends, so a server that drains waits its whole grace period for
every watcher; and when one watcher of a service leaves, it drops that service's condition for
all of them, so the others are never told of a change again. This ``Watch`` sends the current
status, then each change, and ends (after sending NOT_SERVING) once the server drains.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health, health_pb2

__all__ = ["HealthServicer"]

_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": _SERVING}
        self._changed = asyncio.Event()  # replaced at each change: waiters hold the old one
        self._draining = False

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def serving(self, service: str = "") -> bool:
        """Whether ``service`` is SERVING now: plain state, safe to read from another thread
        (the probe port's, ``tokenrelay._probes``)."""
        return bool(self._statuses.get(service, _UNKNOWN) == _SERVING)

    async def set(self, service: str, status: Any) -> None:
        if self._draining:
            return
        await super().set(service, status)
        self._statuses[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining = True
        self._statuses = dict.fromkeys(self._statuses, _NOT_SERVING)
        self._notify()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, _UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._draining:
                return
            await changed.wait()
