"""HTTP handlers: each OpenAI request becomes one ``GenerateStream`` call to the orchestrator.

A streaming answer's headers go out only with the first message from the orchestrator, so an
error before any token (bad request, no node, first-token timeout) is still a plain HTTP error
with the right status. The call's deadline is the client's budget: the OpenAI SDK's
``x-stainless-timeout`` header where present, else the configured request timeout. When the
client goes away aiohttp cancels the handler (``handler_cancellation``), which closes the stream
and so cancels the gRPC call, which cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from opentelemetry import trace

from tokenrelay.config import EdgeSettings
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._errors import error_body
from tokenrelay.edge._sse import SSEWriter
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, STATE, UPSTREAM
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    RelayError,
    UpstreamUnavailable,
)
from tokenrelay.logs import bind
from tokenrelay.metrics import CONTENT_TYPE
from tokenrelay.tracing import inject
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import retrieval_pb2 as rpb

__all__ = ["routes"]


routes = web.RouteTableDef()


class _Shape(Protocol):
    """How one endpoint spells its answer."""

    @property
    def model(self) -> str: ...

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]: ...
    def text(self, text: str) -> dict[str, Any]: ...
    def end(self, finish: str) -> dict[str, Any]: ...
    def usage(self, usage: pb.Usage) -> dict[str, Any]: ...
    def whole(self, text: str, finish: str, usage: pb.Usage) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class _Chat:
    id: str
    created: int
    model: str
    with_usage: bool

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        chunk = oa.chat_chunk(self.id, self.created, self.model, delta, None, self.with_usage)
        if retrieval is not None:
            chunk["retrieval"] = retrieval
        return [chunk]

    def text(self, text: str) -> dict[str, Any]:
        return oa.chat_chunk(
            self.id, self.created, self.model, {"content": text}, None, self.with_usage
        )

    def end(self, finish: str) -> dict[str, Any]:
        return oa.chat_chunk(self.id, self.created, self.model, {}, finish, self.with_usage)

    def usage(self, usage: pb.Usage) -> dict[str, Any]:
        chunk = oa.chat_chunk(self.id, self.created, self.model, {}, None, True)
        chunk["choices"] = []
        chunk["usage"] = oa.usage(usage)
        return chunk

    def whole(self, text: str, finish: str, usage: pb.Usage) -> dict[str, Any]:
        return oa.chat_completion(self.id, self.created, self.model, text, finish, usage)


@dataclass(frozen=True, slots=True)
class _Completion:
    id: str
    created: int
    model: str
    with_usage: bool

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]:
        if retrieval is None:
            return []
        chunk = oa.completion_chunk(self.id, self.created, self.model, "", None)
        chunk["retrieval"] = retrieval
        return [chunk]

    def text(self, text: str) -> dict[str, Any]:
        return oa.completion_chunk(self.id, self.created, self.model, text, None)

    def end(self, finish: str) -> dict[str, Any]:
        return oa.completion_chunk(self.id, self.created, self.model, "", finish)

    def usage(self, usage: pb.Usage) -> dict[str, Any]:
        chunk = oa.completion(self.id, self.created, self.model, "", None, usage)
        chunk["choices"] = []
        return chunk

    def whole(self, text: str, finish: str, usage: pb.Usage) -> dict[str, Any]:
        return oa.completion(self.id, self.created, self.model, text, finish, usage)


def _budget(request: web.Request, settings: EdgeSettings) -> float:
    try:
        stated = float(request.headers.get("x-stainless-timeout", "inf"))
    except ValueError:
        stated = float("inf")
    return stated if 0 < stated < settings.request_timeout_s else settings.request_timeout_s


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


def _genai_response(model: str, end: pb.StreamEnd) -> dict[str, Any]:
    return {
        "gen_ai.response.model": model,
        "gen_ai.response.finish_reasons": [oa.finish_reason(end) or "cancelled"],
        "gen_ai.usage.input_tokens": end.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": end.usage.completion_tokens,
    }


def _finish(end: pb.StreamEnd) -> str:
    finish = oa.finish_reason(end)
    if finish is None:
        raise UpstreamUnavailable("The inference server cancelled the generation.")
    return finish


async def _next(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
) -> pb.GenerateStreamResponse:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        raise GenerationFailed("The answer ended unexpectedly.") from None


class _Reader:
    """Reads a stream's messages in a task of its own into a small queue, so that waiting for
    the next message with a keep-alive ping costs no task per message (as asyncio.wait did).
    The queue is bounded: a slow client still slows the reading, as it should."""

    _END = object()

    def __init__(self, messages: AsyncGenerator[pb.GenerateStreamResponse, None]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=32)
        self._task = asyncio.create_task(self._pump(messages))

    async def _pump(self, messages: AsyncGenerator[pb.GenerateStreamResponse, None]) -> None:
        try:
            async for message in messages:
                await self._queue.put(message)
            await self._queue.put(self._END)
        except Exception as exc:  # handed to the reader, who raises it
            await self._queue.put(exc)

    async def next(self, sse: SSEWriter, interval_s: float) -> pb.GenerateStreamResponse:
        """The next message; writes ``: ping`` comments while waiting for it."""
        while self._queue.empty():
            try:
                async with asyncio.timeout(interval_s):
                    item = await self._queue.get()
                break
            except TimeoutError:
                await sse.ping()
        else:
            item = self._queue.get_nowait()
        return self._unwrap(item)

    def ready(self) -> pb.GenerateStreamResponse | None:
        """The next message if it has already arrived, else None (never waits)."""
        return None if self._queue.empty() else self._unwrap(self._queue.get_nowait())

    def _unwrap(self, item: Any) -> pb.GenerateStreamResponse:
        if item is self._END:
            raise GenerationFailed("The answer ended unexpectedly.")
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Stop reading (before the stream itself is closed)."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _stream(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: _Shape,
    first: pb.GenerateStreamResponse,
    headers: dict[str, str],
    include_usage: bool,
    retrieval: dict[str, Any] | None,
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    sse = await SSEWriter.open(request, headers)
    streams = request.app[METRICS].streams
    streams.inc()
    reader = _Reader(messages)
    # Messages that arrived together go out as one event, in one write; nothing waits for
    # company, so the first token is never delayed (when the client or the loop is slower than
    # the model, several deltas pile up and cost one event instead of one each).
    frames = [sse.frame(chunk) for chunk in shape.opening(retrieval)]
    texts: list[str] = []

    def flush() -> None:
        if texts:
            frames.append(sse.frame(shape.text("".join(texts))))
            texts.clear()

    try:
        message = first
        while True:
            if message.text:
                texts.append(message.text)
            if message.HasField("end"):
                flush()
                trace.get_current_span().set_attributes(_genai_response(shape.model, message.end))
                frames.append(sse.frame(shape.end(_finish(message.end))))
                if include_usage:
                    frames.append(sse.frame(shape.usage(message.end.usage)))
                await sse.write(frames)
                break
            following = reader.ready()
            if following is None:
                flush()
                await sse.write(frames)
                frames = []
                following = await reader.next(sse, settings.keepalive_interval_s)
            message = following
    except RelayError as exc:
        flush()
        if include_usage and exc.usage is not None:  # what was generated before the error
            used = exc.usage
            frames.append(
                sse.frame(
                    shape.usage(
                        pb.Usage(
                            prompt_tokens=used.prompt_tokens,
                            completion_tokens=used.completion_tokens,
                            total_tokens=used.total_tokens,
                        )
                    )
                )
            )
        await sse.write(frames)
        await sse.error(error_body(exc))
        await sse.response.write_eof()
        return sse.response
    finally:
        await reader.close()
        streams.dec()
    await sse.done()
    return sse.response


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 408 when it does not arrive within ``body_timeout_s``."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    return oa.loads(raw)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    request_id = request[REQUEST_ID]
    body = await _body(request)
    parsed = (oa.parse_chat if chat else oa.parse_completion)(body, request_id)
    span = trace.get_current_span()
    span.set_attributes(_genai_request(parsed, chat))
    with bind(request_id=request_id, model=parsed.request.model):
        messages = request.app[UPSTREAM].stream(
            parsed.request,
            _budget(request, settings),
            metadata=[("x-request-id", request_id), *inject()],
        )
        try:
            first = await _next(messages)
            model = first.start.served_by.model or parsed.request.model
            kind = _Chat if chat else _Completion
            prefix = "chatcmpl-" if chat else "cmpl-"
            shape = kind(prefix + request_id, int(time.time()), model, parsed.include_usage)
            headers = {}
            if first.start.served_by.fallback:
                headers["x-tokenrelay-fallback"] = model
            retrieval = None
            if first.start.HasField("retrieval"):
                retrieval = oa.retrieval_json(first.start.retrieval)
                headers["x-tokenrelay-retrieval"] = retrieval["status"]
            if parsed.stream:
                return await _stream(
                    request, messages, shape, first, headers, parsed.include_usage, retrieval
                )
            texts = []
            message = first
            while True:
                texts.append(message.text)
                if message.HasField("end"):
                    break
                message = await _next(messages)
            answer = shape.whole("".join(texts), _finish(message.end), message.end.usage)
            if retrieval is not None:
                answer["retrieval"] = retrieval
            span.set_attributes(_genai_response(model, message.end))
            return web.json_response(answer, headers=headers)
        finally:
            await messages.aclose()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """Vectors from the embedding model in Triton (OpenAI ``createEmbedding``)."""
    settings = request.app[SETTINGS]
    parsed = oa.parse_embeddings(await _body(request))
    with bind(request_id=request[REQUEST_ID], model=parsed.model):
        response = await request.app[UPSTREAM].embed(
            rpb.EmbedRequest(model=parsed.model, input=parsed.inputs),
            _budget(request, settings),
            metadata=[("x-request-id", request[REQUEST_ID]), *inject()],
        )
    size = len(response.embeddings[0].values) if response.embeddings else 0
    if parsed.dimensions is not None and parsed.dimensions != size:
        raise InvalidRequest(
            f"'{response.model}' makes embeddings of {size} dimensions only.", "dimensions"
        )
    return web.json_response(oa.embeddings_response(response.model, response, parsed.base64))


def _model_json(model: pb.Model) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = await request.app[UPSTREAM].list_models(request.app[SETTINGS].ready_timeout_s * 5)
    return web.json_response({"object": "list", "data": [_model_json(m) for m in models]})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    models = await request.app[UPSTREAM].list_models(request.app[SETTINGS].ready_timeout_s * 5)
    wanted = request.match_info["model"]
    for model in models:
        if model.id == wanted:
            return web.json_response(_model_json(model))
    raise ModelNotFound(wanted)


_OPENAPI = json.loads(resources.files("tokenrelay.edge").joinpath("openapi.json").read_text())


_STATIC = Path(str(resources.files("tokenrelay.edge").joinpath("static")))
_PAGE = (_STATIC / "index.html").read_text()
# The page's own policy: its script, style and API calls come from this origin, nothing else.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@routes.get("/")
async def chat_page(request: web.Request) -> web.Response:
    """The browser chat page (static files, no build step)."""
    return web.Response(
        text=_PAGE, content_type="text/html", headers={"Content-Security-Policy": _PAGE_CSP}
    )


routes.static("/static", _STATIC)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The description of this API (kept in the repository: tokenrelay/edge/openapi.json)."""
    return web.json_response(_OPENAPI)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (no API key: block it at the ingress if the port is public)."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return web.json_response({"status": "not ready", "reason": "draining"}, status=503)
    ready, reason = await request.app[UPSTREAM].ready(request.app[SETTINGS].ready_timeout_s)
    status = "ready" if ready else "not ready"
    return web.json_response({"status": status, "reason": reason}, status=200 if ready else 503)
