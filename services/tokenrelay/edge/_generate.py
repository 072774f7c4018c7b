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
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from tokenrelay.config import EdgeSettings
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._middlewares import error_body
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, STREAMS, UPSTREAM
from tokenrelay.edge._stream import (
    Answer,
    Chat,
    Completion,
    ResumableStream,
    Shape,
    SSEWriter,
    continued_of,
    genai_response,
    new_stream_id,
    pump,
    total_usage,
    with_continued,
)
from tokenrelay.errors import GenerationFailed, RelayError
from tokenrelay.logs import bind
from tokenrelay.security import Secret
from tokenrelay.tenancy import ANONYMOUS, current_caller, forwarded_metadata
from tokenrelay.tracing import inject
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.v1 import retrieval_pb2_grpc as rpb_grpc
from tokenrelay.wire import from_rpc_error

__all__ = [
    "Opened",
    "OrchestratorClient",
    "budget",
    "open_answer",
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


async def _next(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
) -> pb.GenerateStreamResponse:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        raise GenerationFailed("The answer ended unexpectedly.") from None


async def _stream(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: Shape,
    first: pb.GenerateStreamResponse,
    headers: dict[str, str],
    include_usage: bool,
    retrieval: dict[str, Any] | None,
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    sse = await SSEWriter.open(request, headers)
    streams = request.app[METRICS].streams
    streams.inc()
    try:
        await pump(
            sse, messages, shape, first, include_usage, retrieval, settings.keepalive_interval_s
        )
    finally:
        streams.dec()
    return sse.response


@dataclass(frozen=True, slots=True)
class Opened:
    """A generation whose first message has come: how its answer is spelt, that message, the
    response headers its start asks for, and its retrieval report."""

    shape: Shape
    first: pb.GenerateStreamResponse
    headers: dict[str, str]
    retrieval: dict[str, Any] | None


async def open_answer(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    parsed: oa.ParsedRequest,
    chat: bool,
    request_id: str,
) -> Opened:
    """Wait for the orchestrator's first message and make the answer's shape from it. Raises
    the ``RelayError`` that came instead (nothing has gone to the client yet)."""
    first = await _next(messages)
    model = first.start.served_by.model or parsed.request.model
    kind = Chat if chat else Completion
    # A chat completion's id is random: it is what a client resumes its stream by.
    answer_id = new_stream_id(request_id) if chat else "cmpl-" + request_id
    shape = kind(
        answer_id, int(time.time()), model, parsed.include_usage, parsed.n, parsed.logprobs
    )
    headers = {}
    if first.start.served_by.fallback:
        headers["x-tokenrelay-fallback"] = model
    retrieval = None
    if first.start.HasField("retrieval"):
        retrieval = oa.retrieval_json(first.start.retrieval)
        headers["x-tokenrelay-retrieval"] = retrieval["status"]
    return Opened(shape, first, headers, retrieval)


def _owner() -> str:
    """The key id of the caller being served (``anonymous`` without keys)."""
    caller = current_caller.get()
    return caller.key_id if caller is not None else ANONYMOUS


async def _resumable(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: Shape,
    first: pb.GenerateStreamResponse,
    headers: dict[str, str],
    include_usage: bool,
    retrieval: dict[str, Any] | None,
) -> web.StreamResponse:
    """A streamed answer that outlives this connection (``_stream.ResumableStream``): the
    generation runs in a task of its own, which owns ``messages`` from here on; this connection
    is its first client."""
    settings = request.app[SETTINGS]
    gauge = request.app[METRICS].streams

    async def generate(stream: ResumableStream) -> None:
        gauge.inc()
        try:
            await pump(
                stream,
                messages,
                shape,
                first,
                include_usage,
                retrieval,
                settings.keepalive_interval_s,
            )
        except Exception:  # a bug here must still end the stream for its clients
            log.exception("resumable stream failed")
            await stream.fail(error_body(RelayError("Internal error.")))
        finally:
            gauge.dec()
            await messages.aclose()

    owner = _owner()
    stream = request.app[STREAMS].start(shape.id, owner, headers, generate)
    return await stream.serve(request, owner, None)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    request_id = request[REQUEST_ID]
    body = await read_json(request)
    parsed = (oa.parse_chat if chat else oa.parse_completion)(body, request_id)
    span = trace.get_current_span()
    span.set_attributes(_genai_request(parsed, chat))
    with bind(request_id=request_id, model=parsed.request.model):
        messages = request.app[UPSTREAM].stream(
            parsed.request,
            budget(request, settings),
            metadata=[("x-request-id", request_id), *inject()],
        )
        handed_over = False
        try:
            opened = await open_answer(messages, parsed, chat, request_id)
            shape, first, headers, retrieval = (
                opened.shape,
                opened.first,
                opened.headers,
                opened.retrieval,
            )
            model = shape.model
            if parsed.stream and chat and request.app[STREAMS].enabled:
                handed_over = True
                return await _resumable(
                    request, messages, shape, first, headers, parsed.include_usage, retrieval
                )
            if parsed.stream:
                return await _stream(
                    request, messages, shape, first, headers, parsed.include_usage, retrieval
                )
            answers: dict[int, Answer] = {}
            ends: list[pb.StreamEnd] = []
            message = first
            while True:
                answers.setdefault(message.index, Answer(message.index)).add(message)
                if message.HasField("end"):
                    ends.append(message.end)
                    if len(ends) == parsed.n:
                        break
                message = await _next(messages)
            usage = total_usage(ends)
            answer = shape.whole([answers[i] for i in sorted(answers)], usage)
            if retrieval is not None:
                answer["retrieval"] = retrieval
            continued = continued_of(ends)
            if continued is not None:
                with_continued(answer, continued)
                headers["x-tokenrelay-continued"] = str(continued.count)
            span.set_attributes(genai_response(model, ends, usage))
            return web.json_response(answer, headers=headers)
        finally:
            if not handed_over:
                await messages.aclose()


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
    return await request.app[STREAMS].resume(request, request.match_info["id"], _owner())


@routes.post("/v1/chat/completions/{id}/cancel")
async def cancel_chat_completion(request: web.Request) -> web.Response:
    """Stop a streamed chat completion's generation now (its connection may be gone already)."""
    stream_id = request.match_info["id"]
    request.app[STREAMS].cancel(stream_id, _owner())
    return web.json_response({"id": stream_id, "object": "chat.completion", "cancelled": True})


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


def budget(request: web.Request, settings: EdgeSettings) -> float:
    """The request's deadline in seconds: the OpenAI SDK's ``x-stainless-timeout`` where given,
    else (and at most) the configured request timeout."""
    try:
        stated = float(request.headers.get("x-stainless-timeout", "inf"))
    except ValueError:
        stated = float("inf")
    return stated if 0 < stated < settings.request_timeout_s else settings.request_timeout_s


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 408 when it does not arrive within ``body_timeout_s``."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    return oa.loads(raw)
