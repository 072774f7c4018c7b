"""The orchestrator's metrics (``tokenrelay_requests_total`` and friends; see the README)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenrelay.metrics import GAPS, LATENCY, exposition, loop_lag

if TYPE_CHECKING:
    from tokenrelay.orchestrator._pool import NodeStatus

__all__ = ["RelayMetrics"]


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


class RelayMetrics:
    """The orchestrator's metrics."""

    def __init__(self, models: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        """``registry``: the service's registry, shared with the retrieval metrics."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._models = frozenset(models)
        r = self.registry
        self.requests = Counter(
            "tokenrelay_requests", "Requests by how they ended", ["model", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "tokenrelay_time_to_first_token_seconds",
            "Request received → first token sent",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "tokenrelay_inter_token_latency_seconds",
            "Time between two consecutive pieces of an answer",
            ["model"],
            buckets=GAPS,
            registry=r,
        )
        self.duration = Histogram(
            "tokenrelay_request_duration_seconds",
            "Request received → last token (or error)",
            ["model"],
            buckets=LATENCY,
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
        self.continuations = Counter(
            "tokenrelay_continuations",
            "Streams continued on another node after theirs failed (node_failed), was found"
            " hung (probe_failed) or stalled (stalled) once tokens had gone out",
            ["model", "reason"],
            registry=r,
        )
        self.continuation_gap = Histogram(
            "tokenrelay_continuation_gap_seconds",
            "Last piece from the interrupted node → first piece of its continuation",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.loop_lag = loop_lag(r)

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
        return exposition(self.registry)
