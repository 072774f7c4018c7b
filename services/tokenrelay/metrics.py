"""What the services' metrics share: one ``tokenrelay_`` naming convention, the buckets, the event
loop's lag histogram and the exposition format. Each package owns the metrics it records
(``orchestrator/_metrics.py``, ``edge/_metrics.py``, ``retrieval/_metrics.py``), each service has
a registry of its own (so tests can run several in one process), and labels stay bounded:
``model`` is a catalog id (anything else is counted as ``unknown``), ``node`` a configured Triton
endpoint, ``outcome`` one of a fixed set. The README lists every metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tokenrelay._looplag import LAG_BUCKETS
from tokenrelay.errors import RelayError

__all__ = ["CONTENT_TYPE", "GAPS", "LATENCY", "exposition", "loop_lag", "outcome_of"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets: first tokens and whole requests (seconds), and the gaps between tokens.
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GAPS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


def outcome_of(exc: BaseException) -> str:
    """How a request that raised ``exc`` ended (``RelayError.outcome``; anything else failed)."""
    return exc.outcome if isinstance(exc, RelayError) else "failed"


def loop_lag(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "tokenrelay_event_loop_lag_seconds",
        "How late the event loop ran a timer (sampled every 50 ms): blocking or CPU starvation",
        buckets=LAG_BUCKETS,
        registry=registry,
    )


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
