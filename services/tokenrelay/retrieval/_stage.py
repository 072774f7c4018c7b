"""The retrieval stage of a generation, and ingestion.

``Retriever.augment`` embeds the question (the last user message, or the prompt), searches the
collection and places the best chunks in the prompt, numbered ``[1]``, ``[2]``… so the answer can
cite them, within a token budget: at most ``context_share`` of the model's context window, and
never so much that the prompt and ``max_tokens`` would no longer fit. The orchestrator has no
tokenizer of the generation model, so the budget counts tokens conservatively (one per three
bytes; English BPE averages about four). The stage has its own deadline (``retrieval.timeout_s``,
cut to the caller's). When it fails or times out, the request's policy (else the configured one)
decides: answer without context and report ``failed``, or fail the request. A collection that
does not exist, or options out of bounds, are the caller's errors under either policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import trace

from tokenrelay.config import ModelSpec, Settings
from tokenrelay.errors import GenerationFailed, InvalidRequest, RelayError, UpstreamTimeout
from tokenrelay.generation import (
    ChatMessage,
    Citation,
    GenerationRequest,
    OnFailure,
    RetrievalOptions,
    RetrievalReport,
    RetrievalStatus,
    Role,
)
from tokenrelay.metrics import outcome_of
from tokenrelay.retrieval._chunking import split_text
from tokenrelay.retrieval._embedder import Embedder
from tokenrelay.retrieval._metrics import RetrievalMetrics
from tokenrelay.retrieval._types import (
    Hit,
    StoredChunk,
    StoreUnavailable,
    VectorStore,
    check_collection_name,
    chunk_id,
)
from tokenrelay.tracing import tracer

__all__ = ["Document", "Retriever", "estimate_tokens"]

log = logging.getLogger(__name__)

_MARGIN_TOKENS = 32  # template tokens and estimate error
_INSTRUCTION = (
    "Answer the question using the numbered context below. "
    "Cite the passages you use as [1], [2] and so on."
)


def estimate_tokens(text: str) -> int:
    """A conservative token count for a text the orchestrator cannot tokenize."""
    return math.ceil(len(text.encode("utf-8")) / 3)


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    source: str
    text: str


class Retriever:
    def __init__(
        self, settings: Settings, embedder: Embedder, store: VectorStore, metrics: RetrievalMetrics
    ) -> None:
        self._settings = settings.retrieval
        self.embedder = embedder
        self.store = store
        self.metrics = metrics

    # ---- collections and documents -----------------------------------------------------------

    async def create_collection(self, name: str) -> bool:
        check_collection_name(name, "name")
        return await self.store.create_collection(name, self.embedder.spec.dimensions)

    async def upsert(
        self, collection: str, documents: Sequence[Document], create: bool = False
    ) -> tuple[int, int, int]:
        """Chunk, embed and store ``documents``, replacing earlier versions of them.
        Returns (chunks written, earlier chunks removed, embedding tokens)."""
        check_collection_name(collection)
        ids = [d.id for d in documents]
        if not documents:
            raise InvalidRequest("'documents' must hold at least one document.", "documents")
        if len(set(ids)) != len(ids) or not all(ids):
            raise InvalidRequest("Each document needs an id, unique within the call.", "documents")
        pieces: list[tuple[Document, int, str]] = []
        for document in documents:
            chunks = split_text(
                document.text, self._settings.chunk_chars, self._settings.chunk_overlap
            )
            pieces.extend((document, i, text) for i, text in enumerate(chunks))
        if len(pieces) > 10_000:
            raise InvalidRequest(
                "One call may write at most 10000 chunks; send fewer documents.", "documents"
            )
        if create:
            await self.store.create_collection(collection, self.embedder.spec.dimensions)
        embedded = (
            await self.embedder.embed([text for _, _, text in pieces], "ingest") if pieces else None
        )
        stored = [
            StoredChunk(
                chunk_id(collection, document.id, index),
                document.id,
                document.source or document.id,
                index,
                text,
                embedded.vectors[n],
            )
            for n, (document, index, text) in enumerate(pieces)
            if embedded is not None
        ]
        replaced = await self.store.replace_documents(collection, stored, ids)
        return len(stored), replaced, embedded.tokens if embedded else 0

    async def search(
        self, collection: str, query: str, top_k: int | None, min_score: float | None
    ) -> list[Hit]:
        """The chunks of ``collection`` most similar to ``query`` (``top_k`` None: the
        configured default). Raises ``InvalidRequest`` for arguments out of bounds."""
        check_collection_name(collection)
        top_k = self._top_k(top_k)
        self._check_score(min_score)
        self.embedder.check([query], "query")
        return await self._lookup(collection, query, top_k, min_score)

    async def _lookup(
        self, collection: str, query: str, top_k: int, min_score: float | None, request_id: str = ""
    ) -> list[Hit]:
        """Embed ``query`` and search ``collection`` (arguments already checked)."""
        with tracer().start_as_current_span("tokenrelay.embed"):
            embedded = await self.embedder.embed([query], "query", request_id)
        with tracer().start_as_current_span("tokenrelay.search"):
            return await self.store.search(collection, embedded.vectors[0], top_k, min_score)

    def _top_k(self, top_k: int | None, param: str = "top_k") -> int:
        if top_k is None:
            return self._settings.default_top_k
        if not 1 <= top_k <= self._settings.max_top_k:
            raise InvalidRequest(
                f"'{param}' must be between 1 and {self._settings.max_top_k}; got {top_k}.", param
            )
        return top_k

    @staticmethod
    def _check_score(min_score: float | None, param: str = "min_score") -> None:
        if min_score is not None and not (math.isfinite(min_score) and -1 <= min_score <= 1):
            raise InvalidRequest(f"'{param}' must be between -1 and 1; got {min_score}.", param)

    # ---- the stage ---------------------------------------------------------------------------

    def check(self, options: RetrievalOptions) -> None:
        """Raise ``InvalidRequest`` for options out of bounds (before any work is done)."""
        check_collection_name(options.collection, "retrieval.collection")
        self._top_k(options.top_k, "retrieval.top_k")
        self._check_score(options.min_score, "retrieval.min_score")

    async def augment(
        self,
        request: GenerationRequest,
        spec: ModelSpec,
        max_tokens: int,
        time_budget_s: float,
    ) -> tuple[GenerationRequest, RetrievalReport]:
        """``request`` with retrieved context placed in it, and the report of what was used."""
        options = request.retrieval
        assert options is not None
        self.check(options)
        policy = options.on_failure or OnFailure(self._settings.on_failure)
        timeout = min(self._settings.timeout_s, time_budget_s)
        store = self.store.name
        started = time.perf_counter()
        span = trace.get_current_span()
        span.set_attribute("tokenrelay.retrieval.collection", options.collection)
        span.set_attribute("tokenrelay.retrieval.store", store)
        outcome = "failed"
        try:
            try:
                async with asyncio.timeout(timeout):
                    hits = await self._find(request, options)
            except TimeoutError:
                outcome = "timeout"
                message = f"The retrieval stage did not finish within {timeout:g} s."
                if policy == OnFailure.FAIL:
                    raise UpstreamTimeout(message) from None
                return request, self._degraded(message)
            except (StoreUnavailable, GenerationFailed) as exc:
                message = f"The retrieval stage failed: {exc.message[0].lower()}{exc.message[1:]}"
                if policy == OnFailure.FAIL:
                    raise type(exc)(message) from exc
                return request, self._degraded(message)
            except RelayError as exc:
                outcome = outcome_of(exc)
                if isinstance(exc, InvalidRequest) or policy == OnFailure.FAIL:
                    raise
                return request, self._degraded(f"The retrieval stage failed: {exc.message}")
            augmented, citations = self._place(request, spec, max_tokens, hits)
            outcome = "used" if citations else "empty"
            span.set_attribute("tokenrelay.retrieval.hits", len(hits))
            span.set_attribute("tokenrelay.retrieval.used", len(citations))
            self.metrics.retrieved_chunks.labels(store).inc(len(citations))
            return augmented, RetrievalReport(RetrievalStatus(outcome), tuple(citations))
        finally:
            span.set_attribute("tokenrelay.retrieval.outcome", outcome)
            self.metrics.retrievals.labels(store, outcome).inc()
            self.metrics.retrieval_duration.labels(store).observe(time.perf_counter() - started)

    @staticmethod
    def _degraded(message: str) -> RetrievalReport:
        log.warning("answering without retrieved context", extra={"fields": {"reason": message}})
        return RetrievalReport(RetrievalStatus.FAILED, (), message)

    async def _find(self, request: GenerationRequest, options: RetrievalOptions) -> list[Hit]:
        return await self._lookup(
            options.collection,
            _question(request)[-self.embedder.spec.max_input_chars :],
            self._top_k(options.top_k),
            self._settings.min_score if options.min_score is None else options.min_score,
            request.request_id,
        )

    def _place(
        self, request: GenerationRequest, spec: ModelSpec, max_tokens: int, hits: list[Hit]
    ) -> tuple[GenerationRequest, list[Citation]]:
        """Put as many hits (best first) as the budget allows into the request."""
        prompt_tokens = sum(estimate_tokens(m.content) for m in request.messages or ())
        prompt_tokens += estimate_tokens(request.prompt or "")
        room = spec.context_window - max_tokens - prompt_tokens - _MARGIN_TOKENS
        budget = min(int(spec.context_window * self._settings.context_share), room)
        budget -= estimate_tokens(_INSTRUCTION)
        citations: list[Citation] = []
        passages: list[str] = []
        for hit in hits:
            passage = f"[{len(citations) + 1}] (source: {hit.source})\n{hit.text.strip()}"
            cost = estimate_tokens(passage) + 2
            if cost > budget:
                continue
            budget -= cost
            passages.append(passage)
            citations.append(
                Citation(
                    len(citations) + 1,
                    hit.chunk_id,
                    hit.document_id,
                    hit.source,
                    hit.index,
                    hit.score,
                )
            )
        if not passages:
            return request, []
        context = _INSTRUCTION + "\n\nContext:\n" + "\n\n".join(passages)
        return _with_context(request, context), citations


def _question(request: GenerationRequest) -> str:
    if request.messages is not None:
        for message in reversed(request.messages):
            if message.role == Role.USER and message.content.strip():
                return message.content
        raise InvalidRequest("Retrieval needs a user message to search with.", "messages")
    return request.prompt or ""


def _with_context(request: GenerationRequest, context: str) -> GenerationRequest:
    """The context goes right before the question (small models use it best there): into the
    last user message, or in front of a raw prompt."""
    if request.messages is None:
        return dataclasses.replace(request, prompt=f"{context}\n\n{request.prompt}")
    messages = list(request.messages)
    last = max(i for i, m in enumerate(messages) if m.role == Role.USER and m.content.strip())
    question = messages[last].content
    messages[last] = ChatMessage(Role.USER, f"{context}\n\nQuestion: {question}")
    return dataclasses.replace(request, messages=tuple(messages))
