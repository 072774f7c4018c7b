"""The one mapping from errors to HTTP status and OpenAI-shaped error bodies at the edge.

Every error response has the body ``{"error": {"message", "type", "param", "code"}}``: tokenrelay
errors by what their class carries (``http_status``, ``openai_type``; see ``tokenrelay.errors``),
aiohttp's own HTTP errors (unknown route, wrong method, body too large) by their status, anything
else as a 500 with a fixed message (the exception is logged, never sent).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tokenrelay.errors import Overloaded, RelayError

__all__ = ["error_body", "error_middleware", "error_response"]

log = logging.getLogger(__name__)

_HTTP_MESSAGES = {
    404: ("Not found.", "invalid_request_error", None),
    405: ("Method not allowed.", "invalid_request_error", None),
    408: ("The request body did not arrive in time.", "invalid_request_error", None),
    413: ("The request body is too large.", "invalid_request_error", "request_too_large"),
}


def error_body(exc: RelayError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.openai_type,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_response(exc: RelayError) -> web.Response:
    headers = {}
    if isinstance(exc, Overloaded) or exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after or 1)))
    return web.json_response(error_body(exc), status=exc.http_status, headers=headers)


def _http_error(exc: web.HTTPException) -> web.Response:
    message, kind, code = _HTTP_MESSAGES.get(
        exc.status,
        (exc.reason, "invalid_request_error" if exc.status < 500 else "server_error", None),
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(
        body,
        status=exc.status,
        headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RelayError as exc:
        log.info(
            "request refused", extra={"fields": {"status": exc.http_status, "error": exc.message}}
        )
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except Exception:
        log.exception("unexpected error while serving a request")
        return error_response(RelayError("Internal error."))
