"""The orchestrator stays responsive while the vector store works: a real embedded Qdrant whose
search is made to take a second of blocking work (as a search over a very large collection does),
with health checks and /metrics probed meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qdrant_client import QdrantClient

from _support import FakeEmbedder, FakeSource
from tokenrelay.config import Embeddings, OrchestratorSettings, Settings
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.retrieval._qdrant import QdrantStore
from tokenrelay.v1 import retrieval_pb2 as pb
from tokenrelay.v1 import retrieval_pb2_grpc as pb_grpc

SEARCH_S = 1.0


@pytest.fixture
async def slow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Orchestrator]:
    real = QdrantClient.query_points

    def query_points(self: QdrantClient, *args: Any, **kwargs: Any) -> Any:
        time.sleep(SEARCH_S)  # blocking work, like brute force over millions of points
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QdrantClient, "query_points", query_points)
    source = FakeSource()
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,), metrics_listen="127.0.0.1:0"),
        embeddings=Embeddings(dimensions=8),
    )
    orchestrator = Orchestrator(
        settings,
        sources={source.name: source},
        embedding_sources=[FakeEmbedder()],
        store=QdrantStore(path=str(tmp_path / "qdrant")),
    )
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)


async def test_health_and_metrics_answer_promptly_during_slow_searches(
    slow_store: Orchestrator,
) -> None:
    address = f"127.0.0.1:{slow_store.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        retrieval = pb_grpc.RetrievalServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        await retrieval.UpsertDocuments(
            pb.UpsertDocumentsRequest(
                collection="c",
                create_collection=True,
                documents=[pb.Document(id="z", text="Zorblatt's capital is Quenvik.")],
            )
        )
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def search() -> pb.SearchResponse:
            return await retrieval.Search(pb.SearchRequest(collection="c", query="zorblatt"))

        searches = [asyncio.create_task(search()) for _ in range(3)]
        probes: list[float] = []
        async with aiohttp.ClientSession() as http:
            while not all(s.done() for s in searches):
                started = loop.time()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                async with http.get(f"http://127.0.0.1:{slow_store.metrics_port}/metrics") as r:
                    assert r.status == 200
                probes.append(loop.time() - started)
                await asyncio.sleep(0.02)
        results = await asyncio.gather(*searches)
        took = loop.time() - began
    assert all(r.hits[0].document_id == "z" for r in results)
    assert took >= 3 * SEARCH_S  # one store thread: the three searches ran one after another
    assert len(probes) > 20
    # Had a search run on the event loop, a probe would have waited for it (≥ 1 s).
    assert max(probes) < SEARCH_S / 4, max(probes)
