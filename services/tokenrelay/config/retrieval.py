"""``[retrieval]``: the vector store and the retrieval stage of generation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION, AtLeastOne, AtLeastZero, Seconds, Share

Store = Literal["qdrant", "pgvector", "none"]
OnFailure = Literal["answer", "fail"]


@dataclass(frozen=True, slots=True, config=SECTION)
class Retrieval:
    """``[retrieval]``. pgvector's connection string comes from ``TOKENRELAY_POSTGRES_DSN`` only
    (it may hold a password)."""

    store: Store = "qdrant"
    """qdrant, pgvector (``TOKENRELAY_POSTGRES_DSN``) or none (retrieval off)."""
    qdrant_path: str = ".run/qdrant"
    """Qdrant's embedded on-disk mode: a local directory (one process per directory)..."""
    qdrant_url: str = ""
    """... or a Qdrant server or cluster by URL (wins over the path), e.g. http://qdrant:6333."""
    timeout_s: Seconds = 2.0
    """The whole stage of one request: embed the question, search."""
    on_failure: OnFailure = "answer"
    """When the stage fails or times out: answer without context (and say so), or fail. A
    request may choose for itself."""
    default_top_k: AtLeastOne = 4
    """Chunks retrieved when a request names no top_k; at most ``max_top_k``."""
    max_top_k: AtLeastOne = 32
    min_score: Annotated[float, Field(ge=-1, le=1)] = 0.2
    """Chunks less similar to the question than this are left out when a request names no
    min_score (all-MiniLM-L6-v2: unrelated text scores about 0-0.2, related 0.4 and up)."""
    context_share: Share = 0.5
    """At most this share of the model's context window goes to retrieved chunks; the prompt,
    max_tokens and a margin are always left room."""
    chunk_chars: AtLeastOne = 1000
    """Ingestion: chunk length in characters..."""
    chunk_overlap: AtLeastZero = 200
    """... and how much consecutive chunks share (less than ``chunk_chars``)."""

    def __post_init__(self) -> None:
        if self.default_top_k > self.max_top_k:
            raise ValueError(
                f"default_top_k ({self.default_top_k}) must not exceed max_top_k ({self.max_top_k})"
            )
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be less than chunk_chars"
                f" ({self.chunk_chars})"
            )
