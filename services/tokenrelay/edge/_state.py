"""What the edge's handlers share: application keys and the state behind them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from aiohttp import web

from tokenrelay.config import EdgeSettings
from tokenrelay.edge._metrics import EdgeMetrics
from tokenrelay.edge._upstream import OrchestratorClient
from tokenrelay.security import KeyStore, RateLimiter

__all__ = ["AUTH", "METRICS", "REQUEST_ID", "SETTINGS", "STATE", "UPSTREAM", "Auth", "EdgeState"]


@dataclass
class EdgeState:
    draining: bool = False


class Auth:
    """The edge's keys, their request-rate buckets and their requests in flight."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.limiter = RateLimiter()
        self.in_flight: Counter[str] = Counter()


SETTINGS = web.AppKey("settings", EdgeSettings)
UPSTREAM = web.AppKey("upstream", OrchestratorClient)
STATE = web.AppKey("state", EdgeState)
AUTH = web.AppKey("auth", Auth)
METRICS = web.AppKey("metrics", EdgeMetrics)
REQUEST_ID = web.RequestKey("request_id", str)  # the request's id, set by a middleware
