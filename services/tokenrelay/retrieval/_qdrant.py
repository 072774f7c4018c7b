"""Qdrant through ``qdrant-client``: embedded on-disk (local mode, ``path``) or a Qdrant server or
cluster (``url``), behind the same calls.

qdrant-client's calls block, and local mode is not safe for concurrent use, so every call runs on
one worker thread of this store (a few for a server), never on the event loop. The client opens
on first use: an orchestrator that never retrieves never takes the directory's lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy.typing as npt

from tokenrelay.errors import CollectionNotFound
from tokenrelay.retrieval._types import CollectionInfo, Hit, StoredChunk, store_errors

__all__ = ["QdrantStore"]

T = TypeVar("T")
_BATCH = 256


class QdrantStore:
    name = "qdrant"

    def __init__(self, path: str = "", url: str = "", api_key: str | None = None) -> None:
        if not path and not url:
            raise ValueError("QdrantStore needs a path or a url")
        self._path, self._url, self._api_key = path, url, api_key
        self._executor = ThreadPoolExecutor(
            max_workers=4 if url else 1, thread_name_prefix="qdrant"
        )
        self._client: Any = None

    def _open(self) -> Any:
        from qdrant_client import QdrantClient

        if self._client is None:
            if self._url:
                self._client = QdrantClient(url=self._url, api_key=self._api_key, timeout=10)
            else:
                Path(self._path).mkdir(parents=True, exist_ok=True)
                self._client = QdrantClient(path=self._path)
        return self._client

    async def _run(self, call: Callable[[Any], T]) -> T:
        def work() -> T:
            return call(self._open())

        with store_errors(self.name):
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    @staticmethod
    def _require(client: Any, collection: str) -> None:
        if not client.collection_exists(collection):
            raise CollectionNotFound(collection)

    async def create_collection(self, name: str, dimensions: int) -> bool:
        from qdrant_client import models

        def create(client: Any) -> bool:
            if client.collection_exists(name):
                return False
            client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=dimensions, distance=models.Distance.COSINE
                ),
            )
            if self._url:  # a server filters by document through the index; local mode scans
                client.create_payload_index(name, "document_id", models.PayloadSchemaType.KEYWORD)
            return True

        return await self._run(create)

    async def list_collections(self) -> list[CollectionInfo]:
        def collections(client: Any) -> list[CollectionInfo]:
            found = []
            for description in client.get_collections().collections:
                info = client.get_collection(description.name)
                vectors = info.config.params.vectors
                found.append(
                    CollectionInfo(
                        description.name,
                        int(vectors.size),
                        int(client.count(description.name, exact=True).count),
                    )
                )
            return sorted(found, key=lambda c: c.name)

        return await self._run(collections)

    async def delete_collection(self, name: str) -> bool:
        def delete(client: Any) -> bool:
            if not client.collection_exists(name):
                return False
            return bool(client.delete_collection(name))

        return await self._run(delete)

    @staticmethod
    def _documents(document_ids: Sequence[str]) -> Any:
        from qdrant_client import models

        return models.Filter(
            must=[
                models.FieldCondition(
                    key="document_id", match=models.MatchAny(any=list(document_ids))
                )
            ]
        )

    def _delete(self, client: Any, collection: str, document_ids: Sequence[str]) -> int:
        from qdrant_client import models

        if not document_ids:
            return 0
        selector = self._documents(document_ids)
        existing = int(client.count(collection, count_filter=selector, exact=True).count)
        if existing:
            client.delete(
                collection, points_selector=models.FilterSelector(filter=selector), wait=True
            )
        return existing

    async def replace_documents(
        self, collection: str, chunks: Sequence[StoredChunk], document_ids: Sequence[str]
    ) -> int:
        from qdrant_client import models

        def replace(client: Any) -> int:
            self._require(client, collection)
            removed = self._delete(client, collection, document_ids)
            for start in range(0, len(chunks), _BATCH):
                client.upsert(
                    collection,
                    wait=True,
                    points=[
                        models.PointStruct(
                            id=c.id,
                            vector=c.vector.tolist(),
                            payload={
                                "document_id": c.document_id,
                                "source": c.source,
                                "index": c.index,
                                "text": c.text,
                            },
                        )
                        for c in chunks[start : start + _BATCH]
                    ],
                )
            return removed

        return await self._run(replace)

    async def delete_documents(self, collection: str, document_ids: Sequence[str]) -> int:
        def delete(client: Any) -> int:
            self._require(client, collection)
            return self._delete(client, collection, document_ids)

        return await self._run(delete)

    async def search(
        self, collection: str, vector: npt.NDArray[Any], top_k: int, min_score: float | None
    ) -> list[Hit]:
        def search(client: Any) -> list[Hit]:
            self._require(client, collection)
            points = client.query_points(
                collection,
                query=vector.tolist(),
                limit=top_k,
                score_threshold=min_score,
                with_payload=True,
            ).points
            return [
                Hit(
                    str(p.id),
                    p.payload["document_id"],
                    p.payload["source"],
                    int(p.payload["index"]),
                    p.payload["text"],
                    float(p.score),
                )
                for p in points
            ]

        return await self._run(search)

    async def close(self) -> None:
        def close(client: Any) -> None:
            client.close()

        if self._client is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, close, self._client)
            self._client = None
        self._executor.shutdown(wait=False)
