"""The services' log lines are written by a thread of their own (``tokenrelay.logs``): a stderr
that nobody reads cannot block the caller (the event loop), lines dropped meanwhile are counted
and reported, and a line carries what was bound, its message and its traceback as they were
when it was logged."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tokenrelay import logs
from tokenrelay.logs import bind, configure_logging


@pytest.fixture
def pipe() -> Iterator[tuple[Any, int]]:
    """A stderr stand-in: the write end as a text stream, the read end's descriptor."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    read, write = os.pipe()
    stream = os.fdopen(write, "w")
    yield stream, read
    os.close(read)  # first: a write blocked on the full pipe then fails instead of hanging
    if logs._writer is not None:
        logs._writer.stop()
        logs._writer = None
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    with contextlib.suppress(OSError):
        stream.close()


def _lines(read: int, until: str, limit: int = 1 << 24) -> list[dict[str, Any]]:
    buffer = b""
    while until.encode() not in buffer and len(buffer) < limit:
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        buffer += chunk
    return [json.loads(line) for line in buffer.decode().splitlines() if line]


def test_a_stderr_nobody_reads_does_not_block_the_caller(pipe: tuple[Any, int]) -> None:
    stream, read = pipe
    configure_logging("edge", stream=stream)
    log = logging.getLogger("tokenrelay.test")
    done = threading.Event()

    def flood() -> None:  # ~300 bytes a line: the pipe's 64 KiB fill after ~200 lines
        for i in range(30_000):
            log.info("request served", extra={"fields": {"i": i, "pad": "x" * 200}})
        done.set()

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    assert done.wait(20), "logging blocked on a full stderr"
    # Reading now lets the writer catch up; it then says how many lines it dropped.
    lines = _lines(read, "log lines dropped")
    notices = [line for line in lines if line["msg"] == "log lines dropped: stderr fell behind"]
    assert notices and notices[0]["dropped"] > 0
    served = [line for line in lines if line["msg"] == "request served"]
    assert served[0]["i"] == 0 and served[0]["service"] == "edge"
    assert len(served) + notices[0]["dropped"] <= 30_000


def test_a_line_carries_what_was_bound_and_its_traceback_when_logged(
    pipe: tuple[Any, int],
) -> None:
    stream, read = pipe
    configure_logging("orchestrator", stream=stream)
    log = logging.getLogger("tokenrelay.test")
    mutable = ["before"]
    with bind(request_id="r-1", model="m"):
        log.info("asked for %s", mutable)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    mutable[0] = "after"  # changed once the call returned: the line keeps what it was
    log.info("last")
    lines = _lines(read, '"last"')
    asked, failed, last = lines
    assert asked["msg"] == "asked for ['before']"
    assert (asked["request_id"], asked["model"]) == ("r-1", "m")
    assert failed["request_id"] == "r-1" and "ValueError: boom" in failed["exc"]
    assert "Traceback" in failed["exc"]
    assert "request_id" not in last


def test_what_waits_is_written_at_exit(pipe: tuple[Any, int]) -> None:
    stream, read = pipe
    configure_logging("edge", stream=stream)
    log = logging.getLogger("tokenrelay.test")
    for i in range(100):
        log.warning("line", extra={"fields": {"i": i}})
    assert logs._writer is not None
    logs._writer.stop()  # what atexit calls
    logs._writer = None
    stream.flush()
    lines = _lines(read, '"i": 99')
    assert [line["i"] for line in lines] == list(range(100))


def test_a_bad_format_string_does_not_raise_to_the_caller(pipe: tuple[Any, int]) -> None:
    stream, read = pipe
    configure_logging("edge", stream=stream)
    log = logging.getLogger("tokenrelay.test")
    logging.raiseExceptions, saved = False, logging.raiseExceptions  # as in production
    try:
        log.info("%d requests", "many")  # TypeError inside logging, not in the caller
    finally:
        logging.raiseExceptions = saved
    log.info("after")
    assert [line["msg"] for line in _lines(read, '"after"')] == ["after"]
