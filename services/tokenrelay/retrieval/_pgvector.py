"""PostgreSQL with pgvector through asyncpg: one table per collection, with an HNSW index on
cosine distance, and a registry table of the collections.

asyncpg is asynchronous end to end, so nothing here blocks the event loop. The pool opens on
first use and creates the ``vector`` extension when missing (the role needs the right to, or an
administrator creates it beforehand). Any managed PostgreSQL with pgvector, a replica set or a
Citus cluster speaks the same SQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy.typing as npt

from tokenrelay.errors import CollectionNotFound
from tokenrelay.retrieval._types import CollectionInfo, Hit, StoredChunk, store_errors

__all__ = ["PgVectorStore"]

T = TypeVar("T")
_REGISTRY = "tokenrelay_collections"


def _table(collection: str) -> str:
    # Collection names are checked (letters, digits, '_', '-') before they get here.
    return f'"tokenrelay_c_{collection}"'


async def _delete(connection: Any, table: str, document_ids: Sequence[str]) -> int:
    """Remove the documents' chunks; returns how many there were."""
    removed = await connection.fetchval(
        f"WITH gone AS (DELETE FROM {table} WHERE document_id = ANY($1::text[])"
        " RETURNING 1) SELECT count(*) FROM gone",
        list(document_ids),
    )
    return int(removed)


def _vector(values: npt.NDArray[Any]) -> str:
    return "[" + ",".join(f"{v:.7g}" for v in values.tolist()) + "]"


class PgVectorStore:
    name = "pgvector"

    def __init__(self, dsn: str, max_connections: int = 8, connect_timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self._max = max_connections
        self._timeout = connect_timeout_s
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def _open(self) -> Any:
        import asyncpg

        async with self._opening:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._max,
                    timeout=self._timeout,
                    command_timeout=30,
                )
                async with pool.acquire() as connection:
                    await connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
                    await connection.execute(
                        f"CREATE TABLE IF NOT EXISTS {_REGISTRY} (name text PRIMARY KEY,"
                        " dimensions integer NOT NULL, created timestamptz NOT NULL DEFAULT now())"
                    )
                self._pool = pool
        return self._pool

    async def _run(self, call: Callable[[Any], Awaitable[T]]) -> T:
        with store_errors(self.name):
            pool = await self._open()
            async with pool.acquire() as connection:
                return await call(connection)

    @staticmethod
    async def _require(connection: Any, collection: str) -> None:
        found = await connection.fetchval(f"SELECT 1 FROM {_REGISTRY} WHERE name = $1", collection)
        if found is None:
            raise CollectionNotFound(collection)

    async def create_collection(self, name: str, dimensions: int) -> bool:
        async def create(connection: Any) -> bool:
            async with connection.transaction():
                inserted = await connection.fetchval(
                    f"INSERT INTO {_REGISTRY} (name, dimensions) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO NOTHING RETURNING 1",
                    name,
                    dimensions,
                )
                if inserted is None:
                    return False
                table = _table(name)
                await connection.execute(
                    f"CREATE TABLE {table} (id uuid PRIMARY KEY, document_id text NOT NULL,"
                    f" source text NOT NULL, idx integer NOT NULL, text text NOT NULL,"
                    f" embedding vector({int(dimensions)}) NOT NULL)"
                )
                await connection.execute(f"CREATE INDEX ON {table} (document_id)")
                await connection.execute(
                    f"CREATE INDEX ON {table} USING hnsw (embedding vector_cosine_ops)"
                )
                return True

        return await self._run(create)

    async def list_collections(self) -> list[CollectionInfo]:
        async def collections(connection: Any) -> list[CollectionInfo]:
            rows = await connection.fetch(f"SELECT name, dimensions FROM {_REGISTRY} ORDER BY name")
            found = []
            for row in rows:
                count = await connection.fetchval(f"SELECT count(*) FROM {_table(row['name'])}")
                found.append(CollectionInfo(row["name"], int(row["dimensions"]), int(count)))
            return found

        return await self._run(collections)

    async def delete_collection(self, name: str) -> bool:
        async def delete(connection: Any) -> bool:
            async with connection.transaction():
                removed = await connection.fetchval(
                    f"DELETE FROM {_REGISTRY} WHERE name = $1 RETURNING 1", name
                )
                await connection.execute(f"DROP TABLE IF EXISTS {_table(name)}")
                return removed is not None

        return await self._run(delete)

    async def replace_documents(
        self, collection: str, chunks: Sequence[StoredChunk], document_ids: Sequence[str]
    ) -> int:
        table = _table(collection)

        async def replace(connection: Any) -> int:
            await self._require(connection, collection)
            async with connection.transaction():
                removed = await _delete(connection, table, document_ids)
                await connection.executemany(
                    f"INSERT INTO {table} (id, document_id, source, idx, text, embedding)"
                    " VALUES ($1::uuid, $2, $3, $4, $5, $6::vector)",
                    [
                        (c.id, c.document_id, c.source, c.index, c.text, _vector(c.vector))
                        for c in chunks
                    ],
                )
                return removed

        return await self._run(replace)

    async def delete_documents(self, collection: str, document_ids: Sequence[str]) -> int:
        table = _table(collection)

        async def delete(connection: Any) -> int:
            await self._require(connection, collection)
            return await _delete(connection, table, document_ids)

        return await self._run(delete)

    async def search(
        self, collection: str, vector: npt.NDArray[Any], top_k: int, min_score: float | None
    ) -> list[Hit]:
        table = _table(collection)

        async def search(connection: Any) -> list[Hit]:
            await self._require(connection, collection)
            rows = await connection.fetch(
                f"SELECT id::text AS id, document_id, source, idx, text,"
                f" 1 - (embedding <=> $1::vector) AS score FROM {table}"
                f" ORDER BY embedding <=> $1::vector LIMIT $2",
                _vector(vector),
                top_k,
            )
            hits = [
                Hit(
                    r["id"],
                    r["document_id"],
                    r["source"],
                    int(r["idx"]),
                    r["text"],
                    float(r["score"]),
                )
                for r in rows
            ]
            return [h for h in hits if min_score is None or h.score >= min_score]

        return await self._run(search)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
