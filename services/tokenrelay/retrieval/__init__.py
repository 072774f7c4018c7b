"""Retrieval-augmented generation: chunking, embeddings through Triton, vector stores and the
retrieval stage of a generation.

The public face of the package: the orchestrator and the tests use these names, never the
private modules.
"""

from tokenrelay.retrieval._chunking import split_text
from tokenrelay.retrieval._embedder import Embedded, Embedder, EmbeddingSource
from tokenrelay.retrieval._metrics import RetrievalMetrics
from tokenrelay.retrieval._stage import Document, Retriever, estimate_tokens
from tokenrelay.retrieval._stores import make_store
from tokenrelay.retrieval._types import (
    CollectionInfo,
    Hit,
    StoredChunk,
    StoreUnavailable,
    VectorStore,
    check_collection_name,
    chunk_id,
)

__all__ = [
    "CollectionInfo",
    "Document",
    "Embedded",
    "Embedder",
    "EmbeddingSource",
    "Hit",
    "RetrievalMetrics",
    "Retriever",
    "StoreUnavailable",
    "StoredChunk",
    "VectorStore",
    "check_collection_name",
    "chunk_id",
    "estimate_tokens",
    "make_store",
    "split_text",
]


def __getattr__(name: str) -> object:
    # The store clients (qdrant-client, asyncpg) are imported only by whoever uses them.
    if name == "QdrantStore":
        from tokenrelay.retrieval._qdrant import QdrantStore

        return QdrantStore
    if name == "PgVectorStore":
        from tokenrelay.retrieval._pgvector import PgVectorStore

        return PgVectorStore
    raise AttributeError(name)
