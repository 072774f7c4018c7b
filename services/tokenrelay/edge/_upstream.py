"""The edge's client of the orchestrator: one gRPC channel, errors translated to ``RelayError``.

A failed call becomes the very error the orchestrator raised, rebuilt from its status details
(``tokenrelay.wire``: class, message, param, code, retry hint, usage so far). A status without
them comes from gRPC itself and is mapped by its code; UNAUTHENTICATED from the orchestrator means
the edge itself is misconfigured, so it becomes a plain server error, never a 401 to the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenrelay.config import EdgeSettings
from tokenrelay.security import Secret
from tokenrelay.tenancy import forwarded_metadata
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.v1 import retrieval_pb2_grpc as rpb_grpc
from tokenrelay.wire import from_rpc_error

__all__ = ["OrchestratorClient"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
_NOT_SERVING = "orchestrator not serving (no inference node ready)"
# Pings on the channel to the orchestrator (which allows them this often): a hung orchestrator
# ends the readiness watch within about 15 s.
_KEEPALIVE_MS = 10_000
_PING_TIMEOUT_MS = 5_000


@contextmanager
def _translated() -> Iterator[None]:
    """A failed call as the ``RelayError`` it reports (``tokenrelay.wire``)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        if error.http_status >= 500:
            log.warning(
                "orchestrator call failed",
                extra={"fields": {"grpc_code": exc.code().name, "reason": error.reason}},
            )
        raise error from exc


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class OrchestratorClient:
    """Calls to the orchestrator. Create and close it inside the event loop that uses it.

    With ``settings.orchestrator_tls_ca`` the channel uses TLS (and the edge's certificate for
    mutual TLS when given); with ``secret`` every call carries it (``authorization`` metadata).

    ``readiness`` is the orchestrator's serving status as its health service last pushed it
    (``watch_readiness``), so that ``/readyz`` answers at once instead of waiting behind the
    streams in both processes. The channel pings the orchestrator when idle, so a hung one
    breaks the watch (and readiness) within ``_KEEPALIVE_MS`` + ``_PING_TIMEOUT_MS``.

    Generation and embedding calls forward the current caller (``tokenrelay.tenancy``).
    """

    def __init__(self, settings: EdgeSettings, secret: Secret | None = None) -> None:
        address = settings.orchestrator
        options = [
            ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", _PING_TIMEOUT_MS),
            # gRPC waits 1 s, then up to 120 s, before it tries a refused connection again, and
            # fails every call meanwhile: an orchestrator that starts (or restarts) after the
            # edge would be found minutes late. Try again within a second instead.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if settings.orchestrator_tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.orchestrator_tls_ca),
                private_key=_read(settings.orchestrator_tls_key),
                certificate_chain=_read(settings.orchestrator_tls_cert),
            )
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self.readiness: tuple[bool, str] = (False, "orchestrator not reached yet")
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {secret.value}"),) if secret else ()
        )
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._embeddings = rpb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def stream(
        self,
        request: pb.GenerateStreamRequest,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        """The orchestrator's stream; raises ``RelayError``. Closing it cancels the call."""
        call = self._stub.GenerateStream(
            request, timeout=timeout_s, metadata=(*metadata, *forwarded_metadata(), *self._auth)
        )
        try:
            with _translated():
                async for message in call:
                    yield message
        finally:
            call.cancel()

    async def embed(
        self, request: rpb.EmbedRequest, timeout_s: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> rpb.EmbedResponse:
        with _translated():
            response: rpb.EmbedResponse = await self._embeddings.Embed(
                request,
                timeout=timeout_s,
                metadata=(*metadata, *forwarded_metadata(), *self._auth),
            )
        return response

    async def list_models(self, timeout_s: float) -> list[pb.Model]:
        with _translated():
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=self._auth
            )
        return list(response.models)

    async def watch_readiness(self, retry_s: float = 0.2) -> None:
        """Keep ``readiness`` current from the orchestrator's health ``Watch`` stream, until
        cancelled. When the stream cannot be opened or breaks: not ready, and it is opened
        again after ``retry_s``."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            try:
                async for response in self._health.Watch(request, metadata=self._auth):
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        self.readiness = (True, "ready")
                    else:
                        self.readiness = (False, _NOT_SERVING)
                self.readiness = (False, "orchestrator unreachable (health stream ended)")
            except grpc.aio.AioRpcError as exc:
                self.readiness = (False, f"orchestrator unreachable ({exc.code().name})")
            await asyncio.sleep(retry_s)

    async def close(self) -> None:
        await self._channel.close()
