"""Structured logs: one JSON object a line, with the current request's id and model bound.

``bind(request_id=..., model=...)`` sets context variables that every log line written in that
task (and tasks it starts) carries, so a request's lines can be found with one grep.

Lines are formatted and written by a thread of their own, not by the event loop: a write to
stderr blocks when the pipe behind it is full (a log collector that falls behind, a terminal
that is paused), and a blocked loop serves nobody. The caller only hands the record over; when
``_QUEUE`` records wait already, a record is dropped and counted instead, and the writer says how
many were dropped once it catches up. What waits is written at exit (for up to ``_EXIT_S``).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

__all__ = ["bind", "configure_logging"]

_QUEUE = 10_000  # records waiting for the writer at most; past it, records are dropped
_EXIT_S = 2.0  # at exit, how long the writer may take over what waits

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
        # Handed to the writer thread, a record carries the fields bound where it was made.
        line.update(getattr(record, "bound", None) or _context.get())
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class _Handoff(logging.Handler):
    """Puts each record on the writer's queue, never waiting: a full queue drops it."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__()
        self.records = records
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        # What can change after this call is fixed here, in the caller: the bound fields, the
        # message (its arguments may be mutable) and the traceback (its frames go on running).
        try:
            record.bound = _context.get()
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            self.records.put_nowait(record)
        except queue.Full:
            self.dropped += 1
        except Exception:  # a bad format string: reported as logging does, never raised
            self.handleError(record)


class _Writer:
    """The thread that formats and writes the records ``_Handoff`` hands over."""

    def __init__(self, handler: logging.Handler, handoff: _Handoff) -> None:
        self._handler = handler
        self._handoff = handoff
        self._reported = 0
        self._thread = threading.Thread(target=self._run, name="tokenrelay-logs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        records = self._handoff.records
        while (record := records.get()) is not None:
            dropped = self._handoff.dropped
            if dropped > self._reported and records.empty():
                self._handler.handle(_dropped(record.name, dropped - self._reported))
                self._reported = dropped
            self._handler.handle(record)

    def stop(self) -> None:
        """Write what waits, for up to ``_EXIT_S`` (a stderr nobody reads must not hang exit)."""
        with contextlib.suppress(queue.Full):
            self._handoff.records.put(None, timeout=_EXIT_S)
        self._thread.join(_EXIT_S)


def _dropped(name: str, count: int) -> logging.LogRecord:
    record = logging.LogRecord(
        name, logging.WARNING, __file__, 0, "log lines dropped: stderr fell behind", None, None
    )
    record.fields = {"dropped": count}
    return record


_writer: _Writer | None = None


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    """Send every log line to ``stream`` (stderr) as JSON, written by a thread of its own.
    Call once, from ``__main__``."""
    global _writer
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter(service))
    handoff = _Handoff(queue.Queue(_QUEUE))
    root = logging.getLogger()
    root.handlers[:] = [handoff]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
    if _writer is not None:
        _writer.stop()
    _writer = _Writer(handler, handoff)
    atexit.register(_writer.stop)
