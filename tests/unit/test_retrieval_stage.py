"""The retrieval stage and ingestion with an in-memory store and embedder: chunking, the context
budget, citations, replacement of re-ingested documents, and the failure policy."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from _support import FakeEmbedder, FakeSource, relay_for
from tokenrelay.config import ModelSpec, OrchestratorSettings, Retrieval, Settings
from tokenrelay.errors import (
    CollectionNotFound,
    InvalidRequest,
    UpstreamTimeout,
)
from tokenrelay.generation import ChatMessage, Chunk, GenerationRequest, RetrievalOptions, Sampling
from tokenrelay.orchestrator._pool import NodePool, Placement
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.retrieval import (
    CollectionInfo,
    Document,
    Embedder,
    Hit,
    RetrievalMetrics,
    Retriever,
    StoredChunk,
    StoreUnavailable,
    split_text,
)


class MemoryStore:
    name = "memory"

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.collections: dict[str, dict[str, StoredChunk]] = {}
        self.delay_s = delay_s
        self.fail = fail

    async def create_collection(self, name: str, dimensions: int) -> bool:
        created = name not in self.collections
        self.collections.setdefault(name, {})
        return created

    async def list_collections(self) -> list[CollectionInfo]:
        return [CollectionInfo(n, 8, len(c)) for n, c in self.collections.items()]

    async def delete_collection(self, name: str) -> bool:
        return self.collections.pop(name, None) is not None

    def _get(self, name: str) -> dict[str, StoredChunk]:
        if name not in self.collections:
            raise CollectionNotFound(name)
        return self.collections[name]

    async def replace_documents(
        self, collection: str, chunks: Sequence[StoredChunk], document_ids: Sequence[str]
    ) -> int:
        stored = self._get(collection)
        gone = [k for k, c in stored.items() if c.document_id in document_ids]
        for key in gone:
            del stored[key]
        stored.update({c.id: c for c in chunks})
        return len(gone)

    async def delete_documents(self, collection: str, document_ids: Sequence[str]) -> int:
        return await self.replace_documents(collection, [], document_ids)

    async def search(
        self, collection: str, vector: npt.NDArray[Any], top_k: int, min_score: float | None
    ) -> list[Hit]:
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise StoreUnavailable()
        hits = [
            Hit(c.id, c.document_id, c.source, c.index, c.text, float(vector @ c.vector))
            for c in self._get(collection).values()
        ]
        hits = [h for h in hits if min_score is None or h.score >= min_score]
        return sorted(hits, key=lambda h: -h.score)[:top_k]

    async def close(self) -> None:
        pass


FACTS = {
    "zorblatt.md": "# Zorblatt\n\nThe capital of Zorblatt is Quenvik.",
    "veltrax.md": "Veltrax makes the quantum toaster.",
    "fruit.txt": "A banana is yellow.",
}


async def _stack(
    store: MemoryStore, context_window: int = 4096, **retrieval: Any
) -> tuple[Relay, Retriever, FakeSource]:
    source = FakeSource()
    spec = ModelSpec(id="m", triton_model="m", context_window=context_window, default_max_tokens=64)
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,)),
        models=(spec,),
        retrieval=Retrieval(**retrieval),
    )
    metrics = RetrievalMetrics(CollectorRegistry())
    embedder = Embedder(
        dataclasses.replace(settings.embeddings, dimensions=8), [FakeEmbedder()], metrics
    )
    retriever = Retriever(settings, embedder, store, metrics)
    pool = NodePool({source.name: source}, {"m": Placement("m", (source.name,))})
    relay = relay_for(settings, pool, retriever)
    await pool.probe_once()
    return relay, retriever, source


async def _ingest(retriever: Retriever) -> None:
    await retriever.upsert("facts", [Document(k, k, v) for k, v in FACTS.items()], create=True)


def _ask(question: str, **options: Any) -> GenerationRequest:
    return GenerationRequest(
        model="m",
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", question)),
        sampling=Sampling(max_tokens=16),
        retrieval=RetrievalOptions("facts", **options),
    )


async def _run(relay: Relay, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in relay.stream(request)]


def test_chunks_keep_their_size_overlap_and_every_word() -> None:
    text = "\n\n".join(
        f"## Section {s}\n\n" + " ".join(f"Sentence {s}.{i} says word{s}_{i}." for i in range(20))
        for s in range(6)
    )
    chunks = split_text(text, size=300, overlap=80)
    assert len(chunks) > 6
    assert all(len(c) <= 300 for c in chunks)
    for word in (f"word{s}_{i}" for s in range(6) for i in range(20)):
        assert any(word in c for c in chunks), word
    # Consecutive chunks share text (the overlap), and headings start chunks when they can.
    shared = [a[-40:].split()[-1] in b for a, b in itertools.pairwise(chunks)]
    assert sum(shared) >= len(chunks) // 2
    assert sum(c.startswith("## Section") for c in chunks) >= 3
    assert split_text("short", 300, 80) == ["short"]
    assert split_text("   ", 300, 80) == []


async def test_the_best_chunks_go_into_the_question_with_numbered_citations() -> None:
    relay, retriever, source = await _stack(MemoryStore())
    await _ingest(retriever)
    chunks = await _run(relay, _ask("What is the capital of Zorblatt?", top_k=2))
    start = chunks[0].start
    assert start is not None and start.retrieval is not None
    assert start.retrieval.status == "used"
    assert [c.document_id for c in start.retrieval.citations] == ["zorblatt.md"]
    assert start.retrieval.citations[0].number == 1
    prompt = source.prompts[0]
    # The context sits in the user's turn, before the question; the system turn is untouched.
    assert prompt.index("Be brief.") < prompt.index("[1] (source: zorblatt.md)")
    assert prompt.index("The capital of Zorblatt is Quenvik.") < prompt.index(
        "Question: What is the capital of Zorblatt?"
    )
    assert "banana" not in prompt  # below the default min_score
    metrics = retriever.metrics
    assert metrics.retrievals.labels("memory", "used")._value.get() == 1
    assert metrics.retrieved_chunks.labels("memory")._value.get() == 1
    assert metrics.embedded_texts.labels("query")._value.get() == 1
    assert metrics.embedded_texts.labels("ingest")._value.get() == len(FACTS)


async def test_the_context_budget_leaves_room_for_the_answer() -> None:
    store = MemoryStore()
    relay, retriever, source = await _stack(store, context_window=300)
    long_text = "Zorblatt " + "quenvik " * 120  # ~1 KB: about 330 estimated tokens
    await retriever.upsert(
        "facts",
        [Document("big", "big", long_text), Document("small", "small", "Zorblatt is small.")],
        create=True,
    )
    chunks = await _run(relay, _ask("zorblatt?", top_k=5, min_score=0.0))
    report = chunks[0].start.retrieval  # type: ignore[union-attr]
    assert report is not None and report.status == "used"
    assert [c.document_id for c in report.citations] == ["small"]  # the big one does not fit
    assert "quenvik quenvik" not in source.prompts[0]


async def test_reingesting_a_document_replaces_its_chunks() -> None:
    store = MemoryStore()
    _, retriever, _ = await _stack(store, chunk_chars=40, chunk_overlap=10)
    written, replaced, _ = await retriever.upsert(
        "c", [Document("a.md", "a.md", "Zorblatt one. " * 10)], create=True
    )
    assert written > 1 and replaced == 0
    again, replaced, _ = await retriever.upsert("c", [Document("a.md", "a.md", "Short now.")])
    assert (again, replaced) == (1, written)
    assert [c.text for c in store.collections["c"].values()] == ["Short now."]


@pytest.mark.parametrize("policy", ["answer", "fail"])
async def test_a_failing_store_follows_the_policy(policy: str) -> None:
    relay, retriever, source = await _stack(MemoryStore(fail=True), on_failure=policy)
    await _ingest(retriever)
    if policy == "fail":
        with pytest.raises(StoreUnavailable, match="retrieval stage failed"):
            await _run(relay, _ask("capital of Zorblatt?"))
        assert source.prompts == []  # nothing was generated
        return
    chunks = await _run(relay, _ask("capital of Zorblatt?"))
    report = chunks[0].start.retrieval  # type: ignore[union-attr]
    assert report is not None and report.status == "failed" and report.citations == ()
    assert "vector store is unavailable" in report.message
    assert "Question:" not in source.prompts[0]  # answered without context
    assert retriever.metrics.retrievals.labels("memory", "failed")._value.get() == 1


async def test_a_slow_store_times_out_and_the_request_policy_wins() -> None:
    relay, retriever, source = await _stack(
        MemoryStore(delay_s=5), timeout_s=0.1, on_failure="answer"
    )
    await _ingest(retriever)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UpstreamTimeout, match=r"within 0\.1 s"):
        await _run(relay, _ask("capital of Zorblatt?", on_failure="fail"))
    assert loop.time() - began < 1.0
    chunks = await _run(relay, _ask("capital of Zorblatt?"))
    assert chunks[0].start.retrieval.status == "failed"  # type: ignore[union-attr]
    assert len(source.prompts) == 1
    assert retriever.metrics.retrievals.labels("memory", "timeout")._value.get() == 2


async def test_callers_mistakes_are_errors_under_either_policy() -> None:
    relay, retriever, _ = await _stack(MemoryStore(), on_failure="answer")
    await _ingest(retriever)
    with pytest.raises(CollectionNotFound):
        await _run(relay, dataclasses.replace(_ask("x"), retrieval=RetrievalOptions("nope")))
    for options, param in (
        (RetrievalOptions("bad name!"), "retrieval.collection"),
        (RetrievalOptions("facts", top_k=1000), "retrieval.top_k"),
        (RetrievalOptions("facts", min_score=2.0), "retrieval.min_score"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            await _run(relay, dataclasses.replace(_ask("x"), retrieval=options))
        assert caught.value.param == param
