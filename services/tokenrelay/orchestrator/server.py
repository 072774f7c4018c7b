"""The orchestrator process: the gRPC server, its health and reflection services, its lifetime.

``Orchestrator`` owns the Triton clients, the probe task and the server. ``start()`` probes every
node once, then listens; ``stop(grace)`` turns health NOT_SERVING, refuses new calls, lets
in-flight streams finish for up to ``grace`` seconds, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenrelay._looplag import watch_loop_lag
from tokenrelay.config import Settings, split_hostport
from tokenrelay.generation import TokenSource
from tokenrelay.metrics import CONTENT_TYPE
from tokenrelay.orchestrator._auth import InternalSecretInterceptor
from tokenrelay.orchestrator._pool import NodePool, Placement
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.orchestrator._retrieval import EmbeddingServicer, RetrievalServicer
from tokenrelay.orchestrator._servicer import GenerationServicer
from tokenrelay.orchestrator._triton import TritonNode, TritonTLS
from tokenrelay.retrieval._embedder import Embedder, EmbeddingSource
from tokenrelay.retrieval._stage import Retriever
from tokenrelay.retrieval._types import VectorStore
from tokenrelay.v1 import generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

__all__ = ["SERVICE_NAME", "Orchestrator", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
_RETRIEVAL_SERVICES = tuple(s.full_name for s in retrieval_pb2.DESCRIPTOR.services_by_name.values())


def make_store(settings: Settings) -> VectorStore | None:
    """The configured vector store (None when retrieval is off). Opens on first use."""
    retrieval = settings.retrieval
    if retrieval.store == "qdrant":
        from tokenrelay.retrieval._qdrant import QdrantStore

        return QdrantStore(path=retrieval.qdrant_path, url=retrieval.qdrant_url)
    if retrieval.store == "pgvector":
        from tokenrelay.retrieval._pgvector import PgVectorStore

        assert settings.secrets.postgres_dsn is not None  # checked when the settings load
        return PgVectorStore(settings.secrets.postgres_dsn.value)
    return None


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS for the gRPC API; mutual (client certificates required) with a client CA."""
    tls = settings.orchestrator
    client_ca = Path(tls.tls_client_ca).read_bytes() if tls.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(tls.tls_key).read_bytes(), Path(tls.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class Orchestrator:
    def __init__(
        self,
        settings: Settings,
        sources: Mapping[str, TokenSource] | None = None,
        embedding_sources: Sequence[EmbeddingSource] | None = None,
        store: VectorStore | None = None,
    ) -> None:
        """``sources`` maps node names to token sources; by default a ``TritonNode`` for each
        configured endpoint (tests pass fakes). ``embedding_sources``: the nodes of the
        embedding model (default: ``TritonNode``s of ``embeddings.nodes``); ``store``: the
        vector store (default: as configured)."""
        self._settings = settings
        orchestrator = settings.orchestrator
        placement = {
            m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models
        }
        embedding_nodes = settings.nodes_for(settings.embeddings)
        if sources is None:
            addresses = {a for where in placement.values() for a in where.nodes}
            addresses.update(embedding_nodes)
            sources = {
                a: TritonNode(
                    a,
                    orchestrator.timeouts,
                    reconnect_max_s=orchestrator.probe_interval_s,
                    tls=TritonTLS(
                        orchestrator.triton_tls_ca,
                        orchestrator.triton_tls_cert,
                        orchestrator.triton_tls_key,
                    ),
                )
                for a in sorted(addresses)
            }
        self._sources = dict(sources)
        if embedding_sources is None:
            embedding_sources = [
                typing.cast(EmbeddingSource, self._sources[a])
                for a in embedding_nodes
                if isinstance(self._sources.get(a), TritonNode)
            ]
        self._store = store if store is not None else make_store(settings)
        self._health = health.aio.HealthServicer()
        self._pool = NodePool(
            self._sources,
            placement,
            breaker=orchestrator.breaker,
            on_change=self._serving_changed,
            affinity_slack=orchestrator.routing.affinity_slack,
        )
        self._relay = Relay(settings, self._pool)
        self._embedder = (
            Embedder(settings.embeddings, embedding_sources, self._relay.metrics)
            if embedding_sources
            else None
        )
        if self._store is not None and self._embedder is not None:
            self._relay.retriever = Retriever(
                settings, self._embedder, self._store, self._relay.metrics
            )
        admission_control = self._relay.admission
        self._relay.metrics.watch(
            lambda: admission_control.running, lambda: admission_control.queued, self._pool.status
        )
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port = 0
        # Admission control bounds the generations; this bounds the calls themselves, so that a
        # flood past the queue is refused by gRPC (RESOURCE_EXHAUSTED) before it costs memory.
        # The headroom keeps health checks, ListModels and Status answering under the flood.
        admission = orchestrator.admission
        secret = settings.secrets.internal
        self._server = grpc.aio.server(
            interceptors=[InternalSecretInterceptor(secret)] if secret else [],
            maximum_concurrent_rpcs=admission.max_concurrent + admission.max_queue + 64,
            # gRPC sets SO_REUSEPORT by default: a second orchestrator on a taken port would
            # start and silently share its connections. Refuse the port instead.
            options=[
                ("grpc.so_reuseport", 0),
                # UpsertDocuments carries whole documents (gRPC's default cap is 4 MiB).
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
        )
        self._probe: asyncio.Task[None] | None = None
        self._lag: asyncio.Task[None] | None = None
        self._draining = False
        self.port = 0

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
        address = listen or self._settings.orchestrator.listen
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self._relay, self._pool), self._server
        )
        if self._embedder is not None:
            retrieval_pb2_grpc.add_EmbeddingServiceServicer_to_server(
                EmbeddingServicer(self._embedder), self._server
            )
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(
            RetrievalServicer(self._relay.retriever), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, *_RETRIEVAL_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server,
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._pool.probe_once()
        self._probe = asyncio.create_task(
            self._pool.run(self._settings.orchestrator.probe_interval_s), name="node-probe"
        )
        self._lag = asyncio.create_task(
            watch_loop_lag(self._relay.metrics.loop_lag), name="loop-lag"
        )
        if self._settings.orchestrator.tls_cert:
            self.port = self._server.add_secure_port(address, _server_credentials(self._settings))
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await self._server.start()
        if self._settings.orchestrator.metrics_listen:
            await self._serve_metrics(self._settings.orchestrator.metrics_listen)
        log.info(
            "orchestrator listening", extra={"fields": {"address": address, "port": self.port}}
        )
        return self.port

    async def _serve_metrics(self, address: str) -> None:
        """Prometheus exposition on its own HTTP port (scrapers cannot speak gRPC)."""

        async def metrics(request: web.Request) -> web.Response:
            body = self._relay.metrics.exposition()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        host, port = split_hostport(address)
        site = web.TCPSite(self._metrics_runner, host, port)
        await site.start()
        self.metrics_port = int(self._metrics_runner.addresses[0][1])

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop. Safe to call more than once."""
        grace = self._settings.orchestrator.drain_grace_s if grace_s is None else grace_s
        if not self._draining:
            self._draining = True
            log.info("draining", extra={"fields": {"grace_s": grace}})
            await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        for task in (self._probe, self._lag):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._probe = self._lag = None
        for source in self._sources.values():
            await source.close()
        if self._store is not None:
            await self._store.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    orchestrator = Orchestrator(settings)
    await orchestrator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await orchestrator.stop()
    log.info("orchestrator stopped")
