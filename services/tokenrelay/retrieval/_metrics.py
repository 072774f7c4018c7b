"""The retrieval package's metrics: retrieval stages, chunks placed, texts embedded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from tokenrelay.metrics import LATENCY

__all__ = ["RetrievalMetrics"]


class RetrievalMetrics:
    """Recorded by the retrieval stage and the embedder, on the orchestrator's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        # outcome: used, empty, failed, timeout, invalid, not_found.
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
            buckets=LATENCY,
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
            buckets=LATENCY,
            registry=r,
        )
