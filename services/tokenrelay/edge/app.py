"""The aiohttp application of the edge and its lifetime.

With ``edge.workers`` above 1, ``tokenrelay-edge`` is a supervisor (``tokenrelay._workers``):
that many edge processes share the port (``SO_REUSEPORT``), their API keys' limits are counted
once for all of them by the supervisor, and ``/metrics`` on any of them shows every worker's
samples, labelled ``worker``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from aiohttp import web

from tokenrelay import _loop
from tokenrelay._grpc_io import io_in_force
from tokenrelay._looplag import watch_loop_lag
from tokenrelay._probes import ProbeServer, serve_probes
from tokenrelay._workers import (
    CoordinatorLimits,
    Supervisor,
    WorkerContext,
    reserve_all,
    serve_own_metrics,
    worker_command,
)
from tokenrelay.config import EdgeSettings, Secrets, Tenancy, split_hostport
from tokenrelay.edge._generate import OrchestratorClient
from tokenrelay.edge._generate import routes as generation_routes
from tokenrelay.edge._metrics import EdgeMetrics
from tokenrelay.edge._middlewares import (
    GuardedSite,
    auth_middleware,
    context_middleware,
    error_middleware,
    metrics_middleware,
    on_response_prepare,
)
from tokenrelay.edge._routes import routes
from tokenrelay.edge._state import (
    AUTH,
    METRICS,
    SETTINGS,
    STATE,
    STREAMS,
    UPSTREAM,
    WORKER,
    Auth,
    EdgeState,
    readiness,
)
from tokenrelay.edge._stream import ResumableStreams
from tokenrelay.edge._ws import routes as websocket_routes
from tokenrelay.security import KeyStore, is_loopback
from tokenrelay.tenancy import LimitStore, Tenants, make_limits

__all__ = ["create_app", "run", "serve", "supervise"]

log = logging.getLogger(__name__)


def _upstream_ctx(secrets: Secrets) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        # The channel belongs to the app's event loop: created on startup, closed on cleanup.
        client = OrchestratorClient(app[SETTINGS], secrets.internal)
        app[UPSTREAM] = client
        watch = asyncio.create_task(client.watch_readiness(), name="readiness")
        yield
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await client.close()

    return context


def _limits_ctx(
    tenancy: Tenancy, secrets: Secrets, worker: WorkerContext | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        # A shared store's connections belong to the app's event loop, as the channel does.
        # Workers with the local store count a key's limits as one process would: in their
        # supervisor.
        limits: LimitStore = make_limits(
            tenancy,
            secrets.redis_url,
            # behind the store-down policy, as Redis is: a coordinator unreachable is no 500
            shared=(
                CoordinatorLimits(worker.coordinator)
                if worker is not None and tenancy.store == "local"
                else None
            ),
        )
        app[AUTH].limits = limits
        yield
        await limits.close()

    return context


async def _streams_ctx(app: web.Application) -> AsyncIterator[None]:
    # Resumable streams' generations outlive their handlers: cancelled here, after the drain.
    yield
    await app[STREAMS].close()


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        watch_loop_lag(app[METRICS].loop_lag, beat=app[STATE].heartbeat), name="loop-lag"
    )
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _own_metrics(app: web.Application) -> AsyncIterator[None]:
    """A worker serves its own samples to its siblings, which gather them on a scrape."""
    worker = app[WORKER]
    assert worker is not None
    server = await serve_own_metrics(worker.metrics_socket(worker.index), app[METRICS].registry)
    yield
    server.close()
    await server.wait_closed()


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].draining = True
    log.info("edge draining")
    for session in list(app[STATE].sockets):
        await session.drain()


def create_app(
    settings: EdgeSettings,
    secrets: Secrets | None = None,
    tenancy: Tenancy | None = None,
    worker: WorkerContext | None = None,
) -> web.Application:
    """The edge. API keys are enforced when ``settings.api_keys_file`` or ``secrets.api_key``
    gives any; without them every caller is let in (``run`` allows that on loopback only).
    ``tenancy``: where the keys' limits are counted (default: in this process; in a worker of
    several with the local store, in the group's supervisor). ``worker``: this process is one
    of a supervisor's workers."""
    secrets = secrets or Secrets()
    tenancy = tenancy or Tenancy()
    app = web.Application(
        middlewares=[metrics_middleware, context_middleware, error_middleware, auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[STATE] = EdgeState()
    app[METRICS] = EdgeMetrics()
    app[STREAMS] = ResumableStreams(settings.resume)
    app[METRICS].resumable.set_function(lambda: len(app[STREAMS]))
    app[METRICS].websockets.set_function(lambda: len(app[STATE].sockets))
    keys_file = Path(settings.api_keys_file) if settings.api_keys_file else None
    app[WORKER] = worker
    app[AUTH] = Auth(KeyStore(keys_file, secrets.api_key), Tenants(tenancy))
    app.cleanup_ctx.append(_limits_ctx(tenancy, secrets, worker))
    app.cleanup_ctx.append(_upstream_ctx(secrets))
    app.cleanup_ctx.append(_streams_ctx)  # after the channel's: cleaned up before it closes
    app.cleanup_ctx.append(_loop_lag)
    if worker is not None:
        app.cleanup_ctx.append(_own_metrics)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(on_response_prepare)
    app.add_routes(generation_routes)
    app.add_routes(websocket_routes)
    app.add_routes(routes)
    return app


async def serve(
    settings: EdgeSettings,
    secrets: Secrets | None = None,
    tenancy: Tenancy | None = None,
    worker: WorkerContext | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting and let streams finish within the grace."""
    app = create_app(settings, secrets, tenancy, worker)
    if not app[AUTH].store.enabled:
        host, _ = split_hostport(settings.listen)
        assert is_loopback(host), "check_exposure must have refused this"
        log.warning("no API keys configured: every local caller is let in (loopback only)")
    runner = web.AppRunner(
        app,
        # Cancel a handler as soon as its client disconnects, so the upstream call is cancelled
        # promptly instead of at the next write (see shared/EDGE-FACTS.md).
        handler_cancellation=True,
        shutdown_timeout=settings.drain_grace_s,
        keepalive_timeout=settings.keepalive_timeout_s,
        access_log=None,
    )
    await runner.setup()
    host, port = split_hostport(settings.listen)
    # Workers share the port their supervisor holds (tokenrelay._workers.reserve).
    site = GuardedSite(runner, host, port, settings, reuse_port=worker is not None)
    await site.start()
    app[METRICS].connections.set_function(lambda: site.open)
    probes = _probes(app, worker)
    log.info(
        "edge listening",
        extra={
            "fields": {
                "address": settings.listen,
                "health": settings.health_listen or None,
                "worker": _index(worker),
                "grpc_io": io_in_force(),
            }
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await runner.cleanup()  # closes the listener, then waits for handlers up to the grace
    finally:
        if probes is not None:  # answers (draining: /readyz 503) until the handlers are done
            await asyncio.to_thread(probes.stop)


def _probes(app: web.Application, worker: WorkerContext | None) -> ProbeServer | None:
    """The probe port's server (``health_listen``), started; ``None`` when it is off."""
    address = app[SETTINGS].health_listen
    if not address:
        return None
    return serve_probes(
        address, app[STATE].heartbeat, lambda: readiness(app), reuse_port=worker is not None
    )


def _index(worker: WorkerContext | None) -> int | None:
    return None if worker is None else worker.index


def run(
    settings: EdgeSettings,
    secrets: Secrets | None = None,
    loop: str = "auto",
    tenancy: Tenancy | None = None,
    worker: WorkerContext | None = None,
) -> None:
    _loop.run(serve(settings, secrets, tenancy, worker), loop)


def supervise(settings: EdgeSettings, environ: Mapping[str, str], loop: str = "auto") -> int:
    """Run ``settings.workers`` edge processes on the edge's ports (``listen`` and
    ``health_listen``); the exit code. Raises ``OSError`` when a port is taken."""
    env = dict(environ)
    holders = reserve_all(
        {
            "TOKENRELAY_EDGE_LISTEN": settings.listen,
            "TOKENRELAY_EDGE_HEALTH": settings.health_listen,
        },
        env,
    )
    try:
        supervisor = Supervisor("edge", worker_command("tokenrelay.edge"), settings.workers, env)
        return _loop.run(supervisor.run(), loop)
    finally:
        for each in holders:
            each.close()
