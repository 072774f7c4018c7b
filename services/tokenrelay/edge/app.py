"""The aiohttp application of the edge and its lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from tokenrelay.config import EdgeSettings, split_hostport
from tokenrelay.edge._errors import error_middleware
from tokenrelay.edge._routes import SETTINGS, STATE, UPSTREAM, EdgeState, routes
from tokenrelay.edge._upstream import OrchestratorClient

__all__ = ["create_app", "run"]

log = logging.getLogger(__name__)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    # The channel belongs to the app's event loop: created on startup, closed on cleanup.
    client = OrchestratorClient(app[SETTINGS].orchestrator)
    app[UPSTREAM] = client
    yield
    await client.close()


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].draining = True
    log.info("edge draining")


def create_app(settings: EdgeSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[STATE] = EdgeState()
    app.cleanup_ctx.append(_upstream_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.add_routes(routes)
    return app


def run(settings: EdgeSettings) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting and let streams finish within the grace."""
    host, port = split_hostport(settings.listen)
    log.info("edge listening", extra={"fields": {"address": settings.listen}})
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        # Cancel a handler as soon as its client disconnects, so the upstream call is cancelled
        # promptly instead of at the next write (see shared/EDGE-FACTS.md).
        handler_cancellation=True,
        shutdown_timeout=settings.drain_grace_s,
        access_log=None,
        print=None,
    )
