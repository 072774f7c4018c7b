"""What the edge's handlers share: application keys and the state behind them."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from tokenrelay._workers import WorkerContext
from tokenrelay.config import EdgeSettings
from tokenrelay.edge._metrics import EdgeMetrics
from tokenrelay.edge._upstream import OrchestratorClient
from tokenrelay.security import ApiKey, KeyStore, RateLimiter

__all__ = [
    "AUTH",
    "METRICS",
    "REQUEST_ID",
    "SETTINGS",
    "STATE",
    "UPSTREAM",
    "WORKER",
    "Auth",
    "EdgeState",
    "KeyLimits",
    "LocalKeyLimits",
]


@dataclass
class EdgeState:
    draining: bool = False


class KeyLimits(Protocol):
    """Each key's request rate and requests in flight: this process's (``LocalKeyLimits``), or
    a worker group's, counted by its supervisor (``tokenrelay._workers.RemoteKeyLimits``)."""

    def hold(
        self, key_id: str, rpm: int, streams: int
    ) -> AbstractAsyncContextManager[str | float | None]:
        """For one request's whole life: yields None when it may go, the seconds to wait when
        the key is over its rate (``rpm``), ``"streams"`` when it has ``streams`` in flight."""
        ...


class LocalKeyLimits:
    """``KeyLimits`` of one process: token buckets and a counter of requests in flight."""

    def __init__(self) -> None:
        self.limiter = RateLimiter()
        self.in_flight: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, key_id: str, rpm: int, streams: int) -> AsyncIterator[str | float | None]:
        wait = self.limiter.take(ApiKey(id=key_id, sha256="", requests_per_minute=rpm))
        if wait > 0:
            yield wait
            return
        if streams and self.in_flight[key_id] >= streams:
            yield "streams"
            return
        self.in_flight[key_id] += 1
        try:
            yield None
        finally:
            self.in_flight[key_id] -= 1
            if not self.in_flight[key_id]:
                del self.in_flight[key_id]


class Auth:
    """The edge's keys and the limits that apply to them."""

    def __init__(self, store: KeyStore, limits: KeyLimits | None = None) -> None:
        self.store = store
        self.limits: KeyLimits = limits or LocalKeyLimits()


SETTINGS = web.AppKey("settings", EdgeSettings)
UPSTREAM = web.AppKey("upstream", OrchestratorClient)
STATE = web.AppKey("state", EdgeState)
AUTH = web.AppKey("auth", Auth)
METRICS = web.AppKey("metrics", EdgeMetrics)
# Where this process stands in a group of workers (None: it serves alone).
WORKER: web.AppKey[WorkerContext | None] = web.AppKey("worker")
REQUEST_ID = web.RequestKey("request_id", str)  # the request's id, set by a middleware
