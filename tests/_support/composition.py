"""Pieces of the orchestrator composed for unit tests as ``server.Orchestrator`` composes them."""

from __future__ import annotations

from tokenrelay.config import Settings
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Planner
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.retrieval import Retriever


def relay_for(
    settings: Settings,
    pool: NodePool,
    retriever: Retriever | None = None,
    metrics: RelayMetrics | None = None,
) -> Relay:
    """A relay composed as the orchestrator composes it (``server.Orchestrator``)."""
    return Relay(
        settings,
        Planner(settings.models, settings.orchestrator.limits),
        pool,
        AdmissionControl(settings.orchestrator.admission),
        metrics or RelayMetrics(m.id for m in settings.models),
        retriever,
    )
