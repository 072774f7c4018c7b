"""Structured logs: one JSON object a line, with the current request's id and model bound.

``bind(request_id=..., model=...)`` sets context variables that every log line written in that
task (and tasks it starts) carries, so a request's lines can be found with one grep.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

__all__ = ["bind", "configure_logging"]

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "tokenrelay_log_context", default=MappingProxyType({})
)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line written inside the block (in this task).

    Safe where the block ends in another Context than it began (an async generator closed by
    another task): the fields are then simply dropped with that Context."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        # ValueError: the token was created in a different Context; nothing of ours to restore
        with contextlib.suppress(ValueError):
            _context.reset(token)


class _JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_context.get())
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log line to stderr as JSON. Call once, from ``__main__``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
