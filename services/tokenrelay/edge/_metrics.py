"""The edge's metrics: HTTP requests by route and status, open connections and streams."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenrelay.metrics import LATENCY, exposition, loop_lag

__all__ = ["EdgeMetrics"]


class EdgeMetrics:
    """The edge's metrics: HTTP requests by route and status, open connections and streams."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tokenrelay_edge_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "tokenrelay_edge_request_duration_seconds",
            "HTTP request received → response complete",
            ["route"],
            buckets=LATENCY,
            registry=r,
        )
        self.streams = Gauge(
            "tokenrelay_edge_streams_open", "SSE responses being written now", registry=r
        )
        self.connections = Gauge(
            "tokenrelay_edge_connections_open", "Client connections open now", registry=r
        )
        self.refused = Counter(
            "tokenrelay_edge_key_limited",
            "Requests refused by a key's limit (metered keys by id, others as 'other')",
            ["key", "limit"],
            registry=r,
        )
        self.loop_lag = loop_lag(r)

    def exposition(self) -> bytes:
        return exposition(self.registry)
