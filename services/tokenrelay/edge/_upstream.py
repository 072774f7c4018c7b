"""The edge's client of the orchestrator: one gRPC channel, errors translated to ``RelayError``.

A failed call becomes the very error the orchestrator raised, rebuilt from its status details
(``tokenrelay.wire``: class, message, param, code, retry hint, usage so far). A status without
them comes from gRPC itself and is mapped by its code; UNAUTHENTICATED from the orchestrator means
the edge itself is misconfigured, so it becomes a plain server error, never a 401 to the client.
"""

from __future__ import annotations

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
    Generation and embedding calls forward the current caller (``tokenrelay.tenancy``).
    """

    def __init__(self, settings: EdgeSettings, secret: Secret | None = None) -> None:
        address = settings.orchestrator
        if settings.orchestrator_tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.orchestrator_tls_ca),
                private_key=_read(settings.orchestrator_tls_key),
                certificate_chain=_read(settings.orchestrator_tls_cert),
            )
            self._channel = grpc.aio.secure_channel(address, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(address)
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

    async def ready(self, timeout_s: float) -> tuple[bool, str]:
        """Whether the orchestrator answers and says SERVING; never raises."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=timeout_s,
                metadata=self._auth,
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"orchestrator unreachable ({exc.code().name})"
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return False, "orchestrator not serving (no inference node ready)"
        return True, "ready"

    async def close(self) -> None:
        await self._channel.close()
