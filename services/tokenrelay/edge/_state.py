"""What the edge's handlers share: application keys and the state behind them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from tokenrelay._probes import Heartbeat
from tokenrelay._workers import WorkerContext
from tokenrelay.config import EdgeSettings
from tokenrelay.edge._metrics import EdgeMetrics
from tokenrelay.security import KeyStore
from tokenrelay.tenancy import LimitStore, LocalLimits, StreamLease, Tenants

if TYPE_CHECKING:  # the modules that hold these import this one
    from tokenrelay.edge._generate import OrchestratorClient
    from tokenrelay.edge._stream import ResumableStreams
    from tokenrelay.edge._ws import Session

__all__ = [
    "AUTH",
    "METRICS",
    "REQUEST_ID",
    "SETTINGS",
    "STATE",
    "STREAMS",
    "STREAM_LEASE",
    "UPSTREAM",
    "WORKER",
    "Auth",
    "EdgeState",
    "readiness",
]


@dataclass
class EdgeState:
    draining: bool = False
    sockets: set[Session] = field(default_factory=set)  # open WebSockets, drained on SIGTERM
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # the loop's, for the probe port


class Auth:
    """The edge's keys, the store of their limits (requests per minute, concurrent streams:
    this process's own counters until the app starts with a shared store), and the tenants'
    resolution (metric labels)."""

    def __init__(self, store: KeyStore, tenants: Tenants) -> None:
        self.store = store
        self.limits: LimitStore = LocalLimits()
        self.tenants = tenants


SETTINGS = web.AppKey("settings", EdgeSettings)
UPSTREAM: web.AppKey[OrchestratorClient] = web.AppKey("upstream")
STATE = web.AppKey("state", EdgeState)
AUTH = web.AppKey("auth", Auth)
METRICS = web.AppKey("metrics", EdgeMetrics)
STREAMS: web.AppKey[ResumableStreams] = web.AppKey("streams")  # resumable SSE streams
# Where this process stands in a group of workers (None: it serves alone).
WORKER: web.AppKey[WorkerContext | None] = web.AppKey("worker")
REQUEST_ID = web.RequestKey("request_id", str)  # the request's id, set by a middleware
# The key's concurrent-stream lease of a request (``max_streams``), held by the auth middleware
# until the handler returns, unless a generation that outlives it (a resumable stream) takes it.
STREAM_LEASE: web.RequestKey[StreamLease | None] = web.RequestKey("stream_lease")


def readiness(app: web.Application) -> tuple[bool, str]:
    """``/readyz``'s answer, from plain state (no await: the probe thread calls it too)."""
    if app[STATE].draining:
        return False, "draining"
    # As the orchestrator's health service last said (a watch): no call waits behind streams.
    return app[UPSTREAM].readiness
