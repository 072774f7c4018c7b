"""The embedding model in Triton, as the orchestrator calls it: texts in batches, spread over the
nodes that serve it, the next node tried when one cannot answer."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tokenrelay.config import Embeddings
from tokenrelay.errors import GenerationFailed, InvalidRequest, UpstreamTimeout, UpstreamUnavailable
from tokenrelay.retrieval._metrics import RetrievalMetrics

__all__ = ["Embedded", "Embedder", "EmbeddingSource"]

log = logging.getLogger(__name__)


class EmbeddingSource(Protocol):
    """A node that runs the embedding model (``TritonNode``, or a fake in tests)."""

    @property
    def name(self) -> str: ...

    async def embed(
        self, model: str, texts: Sequence[str], request_id: str, timeout_s: float
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """(vectors [n, d] float32, tokens per text [n]). Raises like ``TokenSource.generate``."""
        ...


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: npt.NDArray[Any]  # [n, dimensions], float32, unit length
    tokens: int


class Embedder:
    def __init__(
        self, spec: Embeddings, sources: Sequence[EmbeddingSource], metrics: RetrievalMetrics
    ) -> None:
        if not sources:
            raise ValueError("the embedding model has no nodes")
        self.spec = spec
        self._sources = list(sources)
        self._turn = itertools.cycle(range(len(self._sources)))
        self._metrics = metrics

    def check(self, texts: Sequence[str], param: str = "input") -> None:
        """Raise ``InvalidRequest`` unless ``texts`` may be embedded in one call."""
        if not texts:
            raise InvalidRequest(f"'{param}' must hold at least one text.", param)
        if len(texts) > self.spec.max_inputs:
            raise InvalidRequest(f"'{param}' may hold at most {self.spec.max_inputs} texts.", param)
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidRequest(f"{param}[{i}] must not be empty.", param)
            if len(text) > self.spec.max_input_chars:
                raise InvalidRequest(
                    f"{param}[{i}] may have at most {self.spec.max_input_chars} characters.", param
                )

    async def _batch(self, texts: Sequence[str], request_id: str) -> tuple[npt.NDArray[Any], int]:
        first = next(self._turn)
        order = self._sources[first:] + self._sources[:first]
        last: Exception | None = None
        for source in order:
            started = time.perf_counter()
            try:
                vectors, tokens = await source.embed(
                    self.spec.triton_model, texts, request_id, self.spec.timeout_s
                )
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                log.warning("embedding node failed", extra={"fields": {"node": source.name}})
                last = exc
                continue
            self._metrics.embedding_duration.observe(time.perf_counter() - started)
            if vectors.shape != (len(texts), self.spec.dimensions):
                log.error(
                    "embedding model answered with the wrong shape",
                    extra={"fields": {"shape": list(vectors.shape), "node": source.name}},
                )
                raise GenerationFailed("The embedding model answered with the wrong shape.")
            return vectors.astype(np.float32, copy=False), int(tokens.sum())
        assert last is not None
        raise last

    async def embed(self, texts: Sequence[str], purpose: str, request_id: str = "") -> Embedded:
        """Embed ``texts`` (checked by the caller) in batches of ``batch_size``."""
        parts, tokens = [], 0
        size = self.spec.batch_size
        for start in range(0, len(texts), size):
            vectors, used = await self._batch(texts[start : start + size], request_id)
            parts.append(vectors)
            tokens += used
        self._metrics.embedded_texts.labels(purpose).inc(len(texts))
        vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return Embedded(vectors, tokens)
