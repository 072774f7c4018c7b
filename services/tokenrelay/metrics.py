"""Prometheus metrics of the orchestrator and the edge: one ``tokenrelay_`` naming convention,
each service with a registry of its own (so tests can run several in one process).

Labels stay bounded: ``model`` is a catalog id (anything else is counted as ``unknown``), ``node``
a configured Triton endpoint, ``outcome`` one of a fixed set. The README lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenrelay._looplag import LAG_BUCKETS
from tokenrelay.errors import RelayError

if TYPE_CHECKING:
    from tokenrelay.orchestrator._pool import NodeStatus

__all__ = ["CONTENT_TYPE", "EdgeMetrics", "RelayMetrics", "outcome_of"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets: first tokens and whole requests (seconds), and the gaps between tokens.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_GAPS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


def outcome_of(exc: BaseException) -> str:
    """How a request that raised ``exc`` ended (``RelayError.outcome``; anything else failed)."""
    return exc.outcome if isinstance(exc, RelayError) else "failed"


class _Live(Collector):
    """Gauges read at scrape time from the objects that own the numbers."""

    def __init__(
        self,
        running: Callable[[], int],
        queued: Callable[[], int],
        nodes: Callable[[], Iterable[NodeStatus]],
    ) -> None:
        self._running, self._queued, self._nodes = running, queued, nodes

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "tokenrelay_requests_running", "Generations running now", value=self._running()
        )
        yield GaugeMetricFamily(
            "tokenrelay_requests_queued",
            "Requests waiting for an admission slot",
            value=self._queued(),
        )
        in_flight = GaugeMetricFamily(
            "tokenrelay_node_requests_in_flight", "Requests in flight per node", labels=["node"]
        )
        breaker = GaugeMetricFamily(
            "tokenrelay_node_breaker_state",
            "Circuit breaker per node: 0 closed, 1 half-open, 2 open",
            labels=["node"],
        )
        for status in self._nodes():
            in_flight.add_metric([status.node], status.in_flight)
            breaker.add_metric(
                [status.node], {"closed": 0, "half_open": 1, "open": 2}[status.breaker.value]
            )
        yield in_flight
        yield breaker

    def describe(self) -> Iterable[Metric]:
        return []


def _loop_lag(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "tokenrelay_event_loop_lag_seconds",
        "How late the event loop ran a timer (sampled every 50 ms): blocking or CPU starvation",
        buckets=LAG_BUCKETS,
        registry=registry,
    )


class RelayMetrics:
    """The orchestrator's metrics."""

    def __init__(self, models: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(models)
        r = self.registry
        self.requests = Counter(
            "tokenrelay_requests", "Requests by how they ended", ["model", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "tokenrelay_time_to_first_token_seconds",
            "Request received → first token sent",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "tokenrelay_inter_token_latency_seconds",
            "Time between two consecutive pieces of an answer",
            ["model"],
            buckets=_GAPS,
            registry=r,
        )
        self.duration = Histogram(
            "tokenrelay_request_duration_seconds",
            "Request received → last token (or error)",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokenrelay_prompt_tokens", "Prompt tokens of generations", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "tokenrelay_completion_tokens",
            "Tokens generated, interrupted generations included",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            "tokenrelay_retries", "Attempts retried on another node", ["model"], registry=r
        )
        self.hedges = Counter(
            "tokenrelay_hedges", "Hedged attempts sent to a second node", ["model"], registry=r
        )
        self.fallbacks = Counter(
            "tokenrelay_fallbacks", "Requests answered by a fallback model", ["model"], registry=r
        )
        self.loop_lag = _loop_lag(r)
        # Retrieval and embeddings. outcome: used, empty, failed, timeout, invalid, not_found.
        self.retrievals = Counter(
            "tokenrelay_retrievals",
            "Retrieval stages of generations by how they ended",
            ["store", "outcome"],
            registry=r,
        )
        self.retrieval_duration = Histogram(
            "tokenrelay_retrieval_duration_seconds",
            "Retrieval stage: embed the question, search the store",
            ["store"],
            buckets=_LATENCY,
            registry=r,
        )
        self.retrieved_chunks = Counter(
            "tokenrelay_retrieval_chunks",
            "Retrieved chunks placed in prompts",
            ["store"],
            registry=r,
        )
        self.embedded_texts = Counter(
            "tokenrelay_embedded_texts",
            "Texts embedded, by purpose (query, ingest, api)",
            ["purpose"],
            registry=r,
        )
        self.embedding_duration = Histogram(
            "tokenrelay_embedding_request_duration_seconds",
            "One batch of texts through the embedding model",
            buckets=_LATENCY,
            registry=r,
        )

    def model(self, name: str) -> str:
        return name if name in self._models else "unknown"

    def watch(
        self,
        running: Callable[[], int],
        queued: Callable[[], int],
        nodes: Callable[[], Iterable[NodeStatus]],
    ) -> None:
        self.registry.register(_Live(running, queued, nodes))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
            buckets=_LATENCY,
            registry=r,
        )
        self.streams = Gauge(
            "tokenrelay_edge_streams_open", "SSE responses being written now", registry=r
        )
        self.connections = Gauge(
            "tokenrelay_edge_connections_open", "Client connections open now", registry=r
        )
        self.loop_lag = _loop_lag(r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
