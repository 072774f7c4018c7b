"""The edge's error middleware: a client that leaves mid-answer is a disconnect, not an error."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web

from tokenrelay.edge._middlewares import error_middleware


class _Transport:
    def __init__(self, closing: bool) -> None:
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing


class _Request:
    def __init__(self, closing: bool) -> None:
        self.transport = _Transport(closing)


async def _reset(request: Any) -> web.StreamResponse:
    raise ConnectionResetError("Cannot write to closing transport")


def _serve(closing: bool) -> web.StreamResponse:
    handler: Any = error_middleware
    return asyncio.run(handler(_Request(closing), _reset))


def test_a_write_to_a_closing_connection_is_logged_as_a_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="tokenrelay.edge._middlewares"):
        response = _serve(closing=True)
    assert response.status == 499
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "client left" in caplog.records[0].getMessage()


def test_a_connection_reset_on_an_open_connection_is_still_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="tokenrelay.edge._middlewares"):
        response = _serve(closing=False)
    assert response.status == 500
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
