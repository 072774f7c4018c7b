"""The usage ledger: per key, per model, per UTC day — requests, prompt and completion tokens,
and how many were cancelled, failed or refused — in PostgreSQL (``TOKENRELAY_POSTGRES_DSN``, the
server pgvector uses).

``record`` never waits: it adds the request to an in-memory batch (one row per day, key and
model, summed), which a background task writes every ``flush_s`` with one statement that adds
to the rows already there (``INSERT … ON CONFLICT DO UPDATE``), so every orchestrator replica
adds to the same rows. While PostgreSQL is down or slow the batch is kept and written later;
once it holds ``max_rows`` rows, a request for a new row is dropped and counted
(``tokenrelay_usage_ledger_lost_total``), so memory stays bounded. A write that fails after
PostgreSQL committed it is written again (at least once, not exactly once).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["UsageLedger", "UsageRecord", "read_usage"]

log = logging.getLogger(__name__)

TABLE = "tokenrelay_usage"
_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cancelled", "failed", "refused")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    day date NOT NULL,
    key_id text NOT NULL,
    model text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cancelled bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    refused bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model)
)
"""
_UPSERT = (
    f"INSERT INTO {TABLE} (day, key_id, model, {', '.join(_COUNTS)})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (day, key_id, model) DO UPDATE SET "
    + ", ".join(f"{c} = {TABLE}.{c} + EXCLUDED.{c}" for c in _COUNTS)
)
# Outcomes of tokenrelay_requests_total{outcome}, as the ledger counts them.
_REFUSED = {"overloaded", "over_budget"}
_FINE = {"stop", "length", "invalid", "not_found"}


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One row of the ledger."""

    day: datetime.date
    key_id: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0
    failed: int = 0
    refused: int = 0


def _counts(outcome: str, prompt: int, completion: int) -> list[int]:
    return [
        1,
        prompt,
        completion,
        int(outcome == "cancelled"),
        int(outcome not in _FINE and outcome not in _REFUSED and outcome != "cancelled"),
        int(outcome in _REFUSED),
    ]


class UsageLedger:
    """Batches usage for PostgreSQL (see the module docstring). ``start`` and ``close`` in the
    event loop that records; ``record`` from the same loop."""

    def __init__(
        self,
        dsn: str,
        flush_s: float = 1.0,
        max_rows: int = 10_000,
        on_lost: Callable[[], None] | None = None,
        on_written: Callable[[int], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._dsn = dsn
        self._flush_s = flush_s
        self._max_rows = max_rows
        self._on_lost = on_lost
        self._on_written = on_written
        self._wall = wall
        self._batch: dict[tuple[datetime.date, str, str], list[int]] = {}
        self._pool: Any = None
        self._task: asyncio.Task[None] | None = None
        self.lost = 0

    @property
    def pending(self) -> int:
        """Rows waiting to be written."""
        return len(self._batch)

    def record(self, key_id: str, model: str, outcome: str, prompt: int, completion: int) -> None:
        """Count one request that ended with ``outcome`` (its ``tokenrelay_requests_total``
        outcome). Never blocks, never raises."""
        day = datetime.datetime.fromtimestamp(self._wall(), datetime.UTC).date()
        row = (day, key_id, model)
        counts = _counts(outcome, prompt, completion)
        current = self._batch.get(row)
        if current is None:
            if len(self._batch) >= self._max_rows:
                self.lost += 1
                if self._on_lost is not None:
                    self._on_lost()
                return
            self._batch[row] = counts
        else:
            for i, n in enumerate(counts):
                current[i] += n

    async def _open(self) -> Any:
        if self._pool is None:
            import asyncpg

            pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=2, timeout=5.0, command_timeout=10
            )
            try:
                async with pool.acquire() as connection:
                    await connection.execute(_SCHEMA)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
        return self._pool

    async def flush(self) -> int:
        """Write the batch now; the rows written. Raises what asyncpg raises (the batch is
        then kept, merged with what was recorded meanwhile)."""
        if not self._batch:
            return 0
        batch, self._batch = self._batch, {}
        try:
            pool = await self._open()
            async with pool.acquire() as connection, connection.transaction():
                await connection.executemany(
                    _UPSERT, [(*row, *counts) for row, counts in batch.items()]
                )
        except BaseException:
            for row, counts in batch.items():  # put back, beside what came meanwhile
                current = self._batch.setdefault(row, [0] * len(_COUNTS))
                for i, n in enumerate(counts):
                    current[i] += n
            raise
        if self._on_written is not None:
            self._on_written(len(batch))
        return len(batch)

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except Exception as exc:  # PostgreSQL down or slow: kept for the next round
                if not failing:
                    log.warning(
                        "usage ledger not written; keeping the batch",
                        extra={"fields": {"error": type(exc).__name__, "pending": self.pending}},
                    )
                failing = True
            else:
                if failing:
                    log.warning("usage ledger written again")
                failing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def close(self) -> None:
        """Stop the writer, write what is left (once, bounded), close the pool."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with asyncio.timeout(5.0):
                await self.flush()
        except Exception as exc:
            log.warning(
                "usage ledger: rows not written at exit",
                extra={"fields": {"error": type(exc).__name__, "pending": self.pending}},
            )
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


async def read_usage(
    dsn: str,
    since: datetime.date,
    until: datetime.date,
    key_id: str | None = None,
    model: str | None = None,
) -> Sequence[UsageRecord]:
    """The ledger's rows from ``since`` to ``until`` (both included), by day, key and model."""
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=5.0)
    try:
        await connection.execute(_SCHEMA)
        rows = await connection.fetch(
            f"SELECT day, key_id, model, {', '.join(_COUNTS)} FROM {TABLE}"
            " WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR key_id = $3)"
            " AND ($4::text IS NULL OR model = $4) ORDER BY day, key_id, model",
            since,
            until,
            key_id,
            model,
        )
    finally:
        await connection.close()
    return [UsageRecord(*row) for row in rows]
