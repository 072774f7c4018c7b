"""``tokenrelay usage``: the usage ledger as a table (or JSON lines), from PostgreSQL
(``TOKENRELAY_POSTGRES_DSN``, the server the orchestrators write to with
``tenancy.ledger = "postgres"``).

    tokenrelay usage                       # today (UTC), every key and model
    tokenrelay usage --days 30 --key alice
    tokenrelay usage --since 2026-05-01 --until 2026-05-31 --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Sequence

from tokenrelay.tenancy._ledger import UsageRecord, read_usage

__all__ = ["add_parser", "run"]

_COLUMNS = (
    "day",
    "key_id",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cancelled",
    "failed",
    "refused",
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = commands.add_parser("usage", help="print the usage ledger (per key, model and day)")
    usage.add_argument("--days", type=int, default=1, help="the last N UTC days (default: today)")
    usage.add_argument("--since", type=datetime.date.fromisoformat, help="first day, YYYY-MM-DD")
    usage.add_argument("--until", type=datetime.date.fromisoformat, help="last day, YYYY-MM-DD")
    usage.add_argument("--key", help="one key id")
    usage.add_argument("--model", help="one model")
    usage.add_argument("--json", action="store_true", help="one JSON object a line")


def _table(rows: Sequence[UsageRecord]) -> str:
    cells = [[str(getattr(r, c)) for c in _COLUMNS] for r in rows]
    total = [
        "total",
        "",
        "",
        *(str(sum(getattr(r, c) for r in rows)) for c in _COLUMNS[3:]),
    ]
    lines = [list(_COLUMNS), *cells, total]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 printed, 1 the ledger could not be read, 2 bad usage."""
    dsn = os.environ.get("TOKENRELAY_POSTGRES_DSN", "")
    if not dsn:
        print("tokenrelay usage: set TOKENRELAY_POSTGRES_DSN", file=sys.stderr)
        return 2
    today = datetime.datetime.now(datetime.UTC).date()
    until = args.until or today
    since = args.since or until - datetime.timedelta(days=max(args.days, 1) - 1)
    try:
        rows = asyncio.run(read_usage(dsn, since, until, args.key, args.model))
    except Exception as exc:  # OSError, and asyncpg's own errors
        print(f"tokenrelay usage: cannot read the ledger: {type(exc).__name__}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            record = dataclasses.asdict(row)
            record["day"] = row.day.isoformat()
            print(json.dumps(record))
    else:
        print(_table(rows))
    return 0
