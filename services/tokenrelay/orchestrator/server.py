"""The orchestrator process: its composition, the gRPC server, its health and reflection
services, its lifetime.

``Orchestrator`` is the composition root: it builds every long-lived object once — the Triton
clients, the node pool, metrics, admission control, the planner, the retriever (when retrieval
is on), the tenants' limits store and usage ledger, the relay — and passes them in.
``start()`` probes every node once, then listens;
``stop(grace)`` turns health NOT_SERVING, refuses new calls, lets in-flight streams finish for up
to ``grace`` seconds, then cancels what is left and closes what was opened, in reverse order,
through one exit stack.

With ``orchestrator.workers`` above 1, ``supervise`` runs that many orchestrator processes on the
same ports (``tokenrelay._workers``): each worker's ``Orchestrator`` is given its
``WorkerContext``, takes its admission slots from the supervisor (one ``AdmissionControl`` for the
group), listens with ``SO_REUSEPORT`` and answers ``/metrics`` with every worker's samples,
labelled ``worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tokenrelay import _loop
from tokenrelay._frames import FramesServer
from tokenrelay._grpc_io import io_in_force
from tokenrelay._looplag import watch_loop_lag
from tokenrelay._probes import Heartbeat, serve_probes
from tokenrelay._workers import (
    CoordinatorLimits,
    RemoteAdmission,
    Supervisor,
    WorkerContext,
    gather,
    reserve_all,
    serve_own_metrics,
    worker_command,
)
from tokenrelay.config import Settings, parse_dns, split_hostport
from tokenrelay.generation import TokenSource
from tokenrelay.metrics import CONTENT_TYPE, exposition
from tokenrelay.orchestrator._admission import AdmissionControl, Slots
from tokenrelay.orchestrator._border import BorderInterceptor, CallerInterceptor
from tokenrelay.orchestrator._discovery import Discovery
from tokenrelay.orchestrator._health import HealthServicer
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Planner
from tokenrelay.orchestrator._pool import NodePool, Placement
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.orchestrator._retrieval import EmbeddingServicer, RetrievalServicer
from tokenrelay.orchestrator._servicer import GenerationServicer
from tokenrelay.orchestrator._triton import TritonNode, TritonTLS
from tokenrelay.retrieval import (
    Embedder,
    EmbeddingSource,
    RetrievalMetrics,
    Retriever,
    VectorStore,
    make_store,
)
from tokenrelay.security import KeyStore
from tokenrelay.tenancy import LimitStore, TenantMetrics, Tenants, UsageLedger, make_limits
from tokenrelay.v1 import generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

__all__ = ["SERVICE_NAME", "Orchestrator", "serve", "supervise"]

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
_EMBEDDING = retrieval_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_RETRIEVAL = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS for the gRPC API; mutual (client certificates required) with a client CA."""
    tls = settings.orchestrator
    client_ca = Path(tls.tls_client_ca).read_bytes() if tls.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(tls.tls_key).read_bytes(), Path(tls.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _triton_node(settings: Settings) -> typing.Callable[[str], TokenSource]:
    """Makes the ``TritonNode`` of an address (configured, or found by discovery)."""
    orchestrator = settings.orchestrator
    tls = TritonTLS(
        orchestrator.triton_tls_ca, orchestrator.triton_tls_cert, orchestrator.triton_tls_key
    )

    def make(address: str) -> TokenSource:
        return TritonNode(
            address,
            orchestrator.timeouts,
            reconnect_max_s=orchestrator.probe_interval_s,
            tls=tls,
            streams=orchestrator.triton_streams,
        )

    return make


class Orchestrator:
    def __init__(
        self,
        settings: Settings,
        sources: Mapping[str, TokenSource] | None = None,
        embedding_sources: Sequence[EmbeddingSource] | None = None,
        store: VectorStore | None = None,
        limits: LimitStore | None = None,
        worker: WorkerContext | None = None,
    ) -> None:
        """``sources`` maps node names to token sources; by default a ``TritonNode`` for each
        configured endpoint (tests pass fakes). ``embedding_sources``: the nodes of the
        embedding model (default: the ``TritonNode``s of ``embeddings.nodes``); ``store``: the
        vector store (default: as configured); ``limits``: where callers' token limits are
        counted (default: as ``tenancy.store`` says; in a worker of several with the local
        store, the group's counters in its supervisor). ``worker``: this process is one of a
        supervisor's workers."""
        self._settings = settings
        self._worker = worker
        orchestrator = settings.orchestrator
        placement = {
            m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models
        }
        embeddings = settings.embeddings
        # The embedder's nodes are fixed (a DNS name there is not followed).
        embedding_nodes = tuple(n for n in settings.nodes_for(embeddings) if not parse_dns(n))
        dns_names = {
            name.entry: name
            for where in placement.values()
            for name in map(parse_dns, where.nodes)
            if name is not None
        }
        make_node = _triton_node(settings)
        if sources is None:
            addresses = {a for where in placement.values() for a in where.nodes}
            addresses = (addresses | set(embedding_nodes)) - set(dns_names)
            sources = {a: make_node(a) for a in sorted(addresses)}
        self._sources = dict(sources)
        if embedding_sources is None:
            embedding_sources = [
                typing.cast(EmbeddingSource, self._sources[a])
                for a in embedding_nodes
                if isinstance(self._sources.get(a), TritonNode)
            ]
        registry = CollectorRegistry(auto_describe=True)
        self._registry = registry
        metrics = RelayMetrics((m.id for m in settings.models), registry)
        self._loop_lag = metrics.loop_lag
        self._heartbeat = Heartbeat()
        retrieval_metrics = RetrievalMetrics(registry)
        embedder = (
            Embedder(embeddings, embedding_sources, retrieval_metrics)
            if embedding_sources
            else None
        )
        self._pool = NodePool(
            self._sources,
            placement,
            breaker=orchestrator.breaker,
            on_change=self._serving_changed,
            affinity_slack=orchestrator.routing.affinity_slack,
            auxiliary=(
                {embeddings.id: Placement(embeddings.triton_model, embedding_nodes)}
                if embedder is not None
                else None
            ),
        )
        self._discovery = (
            Discovery(
                self._pool,
                dns_names.values(),
                make_node,
                interval_s=orchestrator.discovery.interval_s,
                timeout_s=orchestrator.discovery.timeout_s,
            )
            if dns_names
            else None
        )
        self._store = store if store is not None else make_store(settings)
        retriever = (
            Retriever(settings, embedder, self._store, retrieval_metrics)
            if self._store is not None and embedder is not None
            else None
        )
        admission: Slots = (
            AdmissionControl(orchestrator.admission)
            if worker is None
            else RemoteAdmission(worker.coordinator, orchestrator.admission)
        )
        metrics.watch(lambda: admission.running, lambda: admission.queued, self._pool.status)
        tenancy = settings.tenancy
        tenant_metrics = TenantMetrics(registry)
        # Several workers count a key's tokens as one process would: in their supervisor,
        # behind the store-down policy as a shared store is.
        coordinator = (
            CoordinatorLimits(worker.coordinator)
            if worker is not None and tenancy.store == "local"
            else None
        )
        self._limits = limits or make_limits(
            tenancy, settings.secrets.redis_url, tenant_metrics, shared=coordinator
        )
        self._ledger = (
            UsageLedger(
                settings.secrets.postgres_dsn.value,
                tenancy.ledger_flush_s,
                tenancy.ledger_max_rows,
                on_lost=tenant_metrics.ledger_lost.inc,
                on_written=tenant_metrics.ledger_written.inc,
            )
            if tenancy.ledger == "postgres" and settings.secrets.postgres_dsn is not None
            else None
        )
        relay = Relay(
            settings,
            Planner(settings.models, orchestrator.limits),
            self._pool,
            admission,
            metrics,
            retriever,
            limits=self._limits,
            tenant_metrics=tenant_metrics,
            ledger=self._ledger,
        )
        self._health = HealthServicer()
        # Admission control bounds the generations; this bounds the calls themselves, so that a
        # flood past the queue is refused by gRPC (RESOURCE_EXHAUSTED) before it costs memory.
        # The headroom keeps health checks, ListModels and Status answering under the flood.
        admitted = orchestrator.admission
        clients = KeyStore(Path(orchestrator.clients_file)) if orchestrator.clients_file else None
        self._interceptors: list[grpc.aio.ServerInterceptor] = [
            BorderInterceptor(),
            CallerInterceptor(
                Tenants(tenancy),
                settings.secrets.internal,
                clients,
                mutual_tls=bool(orchestrator.tls_client_ca),
                limits=self._limits,
                metrics=tenant_metrics,
            ),
        ]
        self._max_calls = admitted.max_concurrent + admitted.max_queue + 64
        self._server = grpc.aio.server(
            interceptors=self._interceptors,
            maximum_concurrent_rpcs=self._max_calls,
            # gRPC sets SO_REUSEPORT by default: a second orchestrator on a taken port would
            # start and silently share its connections. Refuse the port instead; workers share
            # the port their supervisor holds (tokenrelay._workers.reserve refuses a taken one).
            options=[
                ("grpc.so_reuseport", 0 if worker is None else 1),
                # UpsertDocuments carries whole documents (gRPC's default cap is 4 MiB).
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                # The edge pings its channel every 10 s to notice a hung orchestrator (gRPC's
                # default refuses pings more often than every 5 min on a stream without data).
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
        )
        services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        self._generation = GenerationServicer(
            relay, self._pool, admission, embeddings if embedder is not None else None
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self._generation, self._server)
        self._frames: FramesServer | None = None
        if embedder is not None:
            retrieval_pb2_grpc.add_EmbeddingServiceServicer_to_server(
                EmbeddingServicer(embedder), self._server
            )
            services.append(_EMBEDDING)
        if retriever is not None:
            retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(
                RetrievalServicer(retriever), self._server
            )
            services.append(_RETRIEVAL)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(services, self._server)
        self._resources = contextlib.AsyncExitStack()
        self._draining = False
        self.port = 0
        self.frames_port = 0
        self.metrics_port = 0
        self.health_port = 0

    async def _serving_changed(self, serving: bool) -> None:
        if self._draining:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        log.info("serving status changed", extra={"fields": {"serving": serving}})
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def start(self, listen: str | None = None) -> int:
        """Probe the nodes once, then listen on ``listen`` (default: the configured address).

        Returns the bound port (useful with port 0). Raises ``RuntimeError`` if it cannot bind.
        """
        settings = self._settings.orchestrator
        address = listen or settings.listen
        resources = self._resources
        resources.push_async_callback(self._pool.close)
        if self._store is not None:
            resources.push_async_callback(self._store.close)
        resources.push_async_callback(self._limits.close)
        if self._ledger is not None:
            self._ledger.start()
            resources.push_async_callback(self._ledger.close)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._discovery is not None:
            await self._discovery.resolve_once()
            await resources.enter_async_context(_task(self._discovery.run()))
        await self._pool.probe_once()
        await resources.enter_async_context(_task(self._pool.run(settings.probe_interval_s)))
        await resources.enter_async_context(
            _task(watch_loop_lag(self._loop_lag, beat=self._heartbeat))
        )
        if settings.tls_cert:
            self.port = self._server.add_secure_port(address, _server_credentials(self._settings))
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await self._server.start()
        if settings.frames_listen:
            await self._serve_frames(settings.frames_listen)
        if settings.metrics_listen:
            await self._serve_metrics(settings.metrics_listen)
        if settings.health_listen:
            await self._serve_probes(settings.health_listen)
        log.info(
            "orchestrator listening",
            extra={
                "fields": {
                    "address": address,
                    "port": self.port,
                    "health": settings.health_listen or None,
                    "frames": settings.frames_listen or None,
                    "worker": None if self._worker is None else self._worker.index,
                    "grpc_io": io_in_force(),
                }
            },
        )
        return self.port

    async def _serve_frames(self, address: str) -> None:
        """``GenerateStream`` as frames (``tokenrelay._frames``), through the handler the gRPC
        server runs: the same interceptors, built once here as gRPC builds them per call."""
        method = f"/{SERVICE_NAME}/GenerateStream"
        base = grpc.unary_stream_rpc_method_handler(
            self._generation.GenerateStream,
            request_deserializer=generation_pb2.GenerateStreamRequest.FromString,
            response_serializer=generation_pb2.GenerateStreamResponse.SerializeToString,
        )

        async def innermost(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
            return base

        continuation: Any = innermost
        for interceptor in reversed(self._interceptors):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        handler = await continuation(_CallDetails(method, ()))
        assert handler is not None and handler.request_deserializer is None  # the border decodes
        self._frames = FramesServer(
            {method: (handler.unary_stream, handler.response_serializer)}, self._max_calls
        )
        host, port = split_hostport(address)
        await self._frames.start(host, port, reuse_port=self._worker is not None)
        self.frames_port = self._frames.port

    async def _serve_metrics(self, address: str) -> None:
        """Prometheus exposition on its own HTTP port (scrapers cannot speak gRPC)."""

        worker = self._worker

        async def metrics(request: web.Request) -> web.Response:
            if worker is None:
                body = exposition(self._registry)
            else:  # every worker's samples, labelled worker="i"
                body = await gather(worker, self._registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._resources.push_async_callback(runner.cleanup)
        if worker is not None:
            own = await serve_own_metrics(worker.metrics_socket(worker.index), self._registry)
            self._resources.push_async_callback(own.wait_closed)
            self._resources.callback(own.close)
        host, port = split_hostport(address)
        site = web.TCPSite(runner, host, port, reuse_port=worker is not None)
        await site.start()
        self.metrics_port = int(runner.addresses[0][1])

    def readiness(self) -> tuple[bool, str]:
        """The probe port's ``/readyz``: the health service's status, read as plain state."""
        if self._draining:
            return False, "draining"
        if self._health.serving():
            return True, "ready"
        return False, "not serving (no inference node ready)"

    async def _serve_probes(self, address: str) -> None:
        """``/healthz`` and ``/readyz`` over HTTP from a thread (``tokenrelay._probes``)."""
        probes = serve_probes(
            address, self._heartbeat, self.readiness, reuse_port=self._worker is not None
        )
        self._resources.push_async_callback(asyncio.to_thread, probes.stop)
        self.health_port = probes.port

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop. Safe to call more than once."""
        grace = self._settings.orchestrator.drain_grace_s if grace_s is None else grace_s
        if not self._draining:
            self._draining = True
            log.info("draining", extra={"fields": {"grace_s": grace}})
            await self._health.enter_graceful_shutdown()
        frames = self._frames
        await asyncio.gather(
            self._server.stop(grace), frames.stop(grace or 0.0) if frames else asyncio.sleep(0)
        )
        await self._resources.aclose()


class _CallDetails(typing.NamedTuple):
    """What interceptors read of ``grpc.HandlerCallDetails``."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


@contextlib.asynccontextmanager
async def _task(coro: typing.Coroutine[object, object, None]) -> typing.AsyncIterator[None]:
    """A background task for the orchestrator's lifetime: cancelled and awaited at exit."""
    task = asyncio.create_task(coro)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def serve(settings: Settings, worker: WorkerContext | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    orchestrator = Orchestrator(settings, worker=worker)
    await orchestrator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await orchestrator.stop()
    log.info("orchestrator stopped")


def supervise(settings: Settings, environ: Mapping[str, str]) -> int:
    """Run ``orchestrator.workers`` orchestrator processes on the orchestrator's ports; the exit
    code. Raises ``OSError`` when a port is taken (by anything, another orchestrator too)."""
    orchestrator = settings.orchestrator
    env = dict(environ)
    holders = reserve_all(
        {
            "TOKENRELAY_ORCHESTRATOR_LISTEN": orchestrator.listen,
            "TOKENRELAY_ORCHESTRATOR_FRAMES": orchestrator.frames_listen,
            "TOKENRELAY_ORCHESTRATOR_METRICS": orchestrator.metrics_listen,
            "TOKENRELAY_ORCHESTRATOR_HEALTH": orchestrator.health_listen,
        },
        env,
    )
    try:
        supervisor = Supervisor(
            "orchestrator",
            worker_command("tokenrelay.orchestrator"),
            orchestrator.workers,
            env,
            admission=AdmissionControl(orchestrator.admission),
        )
        return _loop.run(supervisor.run(), settings.event_loop)
    finally:
        for holder in holders:
            holder.close()
