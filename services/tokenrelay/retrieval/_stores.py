"""The configured vector store."""

from __future__ import annotations

from tokenrelay.config import Settings
from tokenrelay.retrieval._types import VectorStore

__all__ = ["make_store"]


def make_store(settings: Settings) -> VectorStore | None:
    """The configured vector store (None when retrieval is off). Opens on first use; the store
    clients are imported only when chosen."""
    retrieval = settings.retrieval
    if retrieval.store == "qdrant":
        from tokenrelay.retrieval._qdrant import QdrantStore

        return QdrantStore(path=retrieval.qdrant_path, url=retrieval.qdrant_url)
    if retrieval.store == "pgvector":
        from tokenrelay.retrieval._pgvector import PgVectorStore

        assert settings.secrets.postgres_dsn is not None  # checked when the settings load
        return PgVectorStore(settings.secrets.postgres_dsn.value)
    return None
