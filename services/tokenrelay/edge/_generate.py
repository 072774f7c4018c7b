"""The generation endpoints: ``/v1/chat/completions`` and ``/v1/completions``, the client of the
orchestrator they call, and what an endpoint reads from a request (its JSON body, the client's
time budget).

Each OpenAI request becomes one ``GenerateStream`` call to the orchestrator. A streaming answer's
headers go out only with the first message from the orchestrator, so an error before any token
(bad request, no node, first-token timeout) is still a plain HTTP error with the right status.
The call's deadline is the client's budget (``budget``). When the client goes away aiohttp
cancels the handler (``handler_cancellation``), which closes the stream and so cancels the gRPC
call, which cancels the Triton request — except for a streamed chat completion, which is
resumable (``_stream.ResumableStream``): its generation goes on for a grace period, waiting for
the client to reopen it with ``GET /v1/chat/completions/{id}/stream``, and is cancelled only then.
How an answer is spelt and pumped to the client is ``_stream``'s.

The client of the orchestrator (``OrchestratorClient``): one gRPC channel, errors translated to
``RelayError``. A failed call becomes the very error the orchestrator raised, rebuilt from its
status details (``tokenrelay.wire``: class, message, param, code, retry hint, usage so far). A
status without them comes from gRPC itself and is mapped by its code; UNAUTHENTICATED from the
orchestrator means the edge itself is misconfigured, so it becomes a plain server error, never a
401 to the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from tokenrelay._frames import FramesClient
from tokenrelay.config import EdgeSettings, split_hostport
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, STREAMS, UPSTREAM
from tokenrelay.edge._stream import (
    answer,
    owner_id,
)
from tokenrelay.logs import bind
from tokenrelay.security import Secret
from tokenrelay.tenancy import forwarded_metadata
from tokenrelay.tracing import inject
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.v1 import retrieval_pb2_grpc as rpb_grpc
from tokenrelay.wire import from_rpc_error

__all__ = [
    "OrchestratorClient",
    "budget",
    "read_body",
    "read_json",
    "routes",
]

routes = web.RouteTableDef()
log = logging.getLogger(__name__)


def _genai_request(parsed: oa.ParsedRequest, chat: bool) -> dict[str, Any]:
    """OpenTelemetry GenAI attributes of a request."""
    sampling = parsed.request.sampling
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if chat else "text_completion",
        "gen_ai.request.model": parsed.request.model,
    }
    if sampling.HasField("max_tokens"):
        attributes["gen_ai.request.max_tokens"] = sampling.max_tokens
    if sampling.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = sampling.temperature
    return attributes


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    request_id = request[REQUEST_ID]
    parsed = oa.parse_body(await read_body(request), request_id, chat)
    span = trace.get_current_span()
    span.set_attributes(_genai_request(parsed, chat))
    with bind(request_id=request_id, model=parsed.request.model):
        messages = request.app[UPSTREAM].stream(
            parsed.request,
            budget(request, settings),
            metadata=[("x-request-id", request_id), *inject()],
        )
        return await answer(request, messages, parsed, chat)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


@routes.get("/v1/chat/completions/{id}/stream")
async def resume_chat_completion(request: web.Request) -> web.StreamResponse:
    """A streamed chat completion reopened after its connection dropped
    (``_stream.ResumableStream``): the events after ``Last-Event-ID`` (all without it), then the
    rest as they come."""
    request.app[METRICS].resumes.inc()
    return await request.app[STREAMS].resume(request, request.match_info["id"], owner_id())


@routes.post("/v1/chat/completions/{id}/cancel")
async def cancel_chat_completion(request: web.Request) -> web.Response:
    """Stop a streamed chat completion's generation now (its connection may be gone already)."""
    stream_id = request.match_info["id"]
    request.app[STREAMS].cancel(stream_id, owner_id())
    return web.json_response({"id": stream_id, "object": "chat.completion", "cancelled": True})


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
_GENERATE_STREAM = f"/{SERVICE_NAME}/GenerateStream"
_RESPONSE = pb.GenerateStreamResponse.FromString
_NOT_SERVING = "orchestrator not serving (no inference node ready)"
# Pings on the channel to the orchestrator (which allows them this often): a hung orchestrator
# ends the readiness watch within about 15 s.
_KEEPALIVE_MS = 10_000
_PING_TIMEOUT_MS = 5_000


class _Translated:
    """``with _translated:``: a failed call as the ``RelayError`` it reports
    (``tokenrelay.wire``). A class, not a ``contextmanager`` generator: no generator per call."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            error = from_rpc_error(exc)
            if error.http_status >= 500:
                log.warning(
                    "orchestrator call failed",
                    extra={"fields": {"grpc_code": exc.code().name, "reason": error.reason}},
                )
            raise error from exc


_translated = _Translated()


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
        self._frames: FramesClient | None = None
        if settings.orchestrator_frames:
            host, port = split_hostport(settings.orchestrator_frames)
            self._frames = FramesClient(host, port)
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
        """The orchestrator's stream, up to the last answer's end; raises ``RelayError``.
        Closing it before then cancels the call."""
        if self._frames is not None:
            messages = self._frames.unary_stream(
                _GENERATE_STREAM,
                request.SerializeToString(),
                timeout_s,
                (*metadata, *forwarded_metadata(), *self._auth),
            )
            # Once every answer has ended, the call's own end follows: the stream stops there
            # and lets it come (``let_end``), so that the connection serves a next call. (A
            # consumer reading ahead would be cancelled while it waited for that end.)
            answers = request.n if request.HasField("n") else 1
            ended, complete = 0, False
            try:
                with _translated:
                    async for data in messages:
                        message = _RESPONSE(data)
                        ended += message.HasField("end")
                        complete = ended >= answers
                        yield message
                        if complete:
                            break
            finally:
                if complete:
                    self._frames.let_end(messages)
                else:
                    await messages.aclose()
            return
        call = self._stub.GenerateStream(
            request, timeout=timeout_s, metadata=(*metadata, *forwarded_metadata(), *self._auth)
        )
        try:
            with _translated:
                async for message in call:
                    yield message
        finally:
            call.cancel()

    async def embed(
        self, request: rpb.EmbedRequest, timeout_s: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> rpb.EmbedResponse:
        with _translated:
            response: rpb.EmbedResponse = await self._embeddings.Embed(
                request,
                timeout=timeout_s,
                metadata=(*metadata, *forwarded_metadata(), *self._auth),
            )
        return response

    async def list_models(self, timeout_s: float) -> list[pb.Model]:
        with _translated:
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
        if self._frames is not None:
            await self._frames.close()
        await self._channel.close()


def budget(request: web.Request, settings: EdgeSettings) -> float:
    """The request's deadline in seconds: the OpenAI SDK's ``x-stainless-timeout`` where given,
    else (and at most) the configured request timeout."""
    try:
        stated = float(request.headers.get("x-stainless-timeout", "inf"))
    except ValueError:
        stated = float("inf")
    return stated if 0 < stated < settings.request_timeout_s else settings.request_timeout_s


async def read_body(request: web.Request) -> bytes:
    """The request's body; 408 when it does not arrive within ``body_timeout_s``."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (``_openai.loads``); 408 as ``read_body``."""
    return oa.loads(await read_body(request))
