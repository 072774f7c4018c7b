"""The vector store seam: what is stored, what a search returns, and the ``VectorStore`` protocol
both stores (Qdrant, pgvector) implement."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from tokenrelay.errors import InvalidRequest, RelayError, UpstreamUnavailable

__all__ = [
    "CollectionInfo",
    "Hit",
    "StoreUnavailable",
    "StoredChunk",
    "VectorStore",
    "check_collection_name",
    "chunk_id",
    "store_errors",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAMESPACE = uuid.UUID("6f1c2d9e-3b7a-4c55-9a0e-2f8d41b7c0aa")


class StoreUnavailable(UpstreamUnavailable):
    """The vector store cannot be reached or failed the operation."""

    outcome = "unavailable"

    def __init__(self, message: str = "The vector store is unavailable.") -> None:
        super().__init__(message)


@contextmanager
def store_errors(store: str) -> Iterator[None]:
    """Our own errors pass; anything a store's client raises is logged and becomes
    ``StoreUnavailable`` (its text is for the log, never the caller)."""
    try:
        yield
    except RelayError:
        raise
    except Exception as exc:
        log.warning(
            "vector store call failed", extra={"fields": {"store": store, "error": repr(exc)}}
        )
        raise StoreUnavailable() from exc


def check_collection_name(name: str, param: str = "collection") -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            "A collection name has 1 to 64 characters: letters, digits, '_' and '-'.", param
        )
    return name


def chunk_id(collection: str, document_id: str, index: int) -> str:
    """A chunk's id: stable for (collection, document, position), so a re-upsert overwrites."""
    return str(uuid.uuid5(_NAMESPACE, f"{collection}\x00{document_id}\x00{index}"))


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: str
    document_id: str
    source: str
    index: int
    text: str
    vector: npt.NDArray[Any]  # float32, unit length


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: str
    document_id: str
    source: str
    index: int
    text: str
    score: float  # cosine similarity


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    dimensions: int
    chunks: int


class VectorStore(Protocol):
    """Chunks and their vectors, grouped in named collections; cosine similarity.

    Every method may raise ``StoreUnavailable``; those naming a collection raise
    ``CollectionNotFound`` when it does not exist. None of them blocks the event loop.
    """

    name: str  # "qdrant" or "pgvector", for metrics and spans

    async def create_collection(self, name: str, dimensions: int) -> bool:
        """Create it; False when it already existed (with any dimensions)."""
        ...

    async def list_collections(self) -> list[CollectionInfo]: ...

    async def delete_collection(self, name: str) -> bool:
        """True when it existed."""
        ...

    async def replace_documents(
        self, collection: str, chunks: Sequence[StoredChunk], document_ids: Sequence[str]
    ) -> int:
        """Store ``chunks`` as the whole content of ``document_ids``: their earlier chunks go.
        Returns how many earlier chunks were removed."""
        ...

    async def delete_documents(self, collection: str, document_ids: Sequence[str]) -> int:
        """Remove the documents' chunks; returns how many."""
        ...

    async def search(
        self, collection: str, vector: npt.NDArray[Any], top_k: int, min_score: float | None
    ) -> list[Hit]:
        """The ``top_k`` chunks most similar to ``vector``, best first."""
        ...

    async def close(self) -> None: ...
