"""The generation endpoints: ``/v1/chat/completions`` and ``/v1/completions``, how each spells
its answer, and the SSE pump.

Each OpenAI request becomes one ``GenerateStream`` call to the orchestrator. A streaming answer's
headers go out only with the first message from the orchestrator, so an error before any token
(bad request, no node, first-token timeout) is still a plain HTTP error with the right status.
The call's deadline is the client's budget (``_request.budget``). When the client goes away
aiohttp cancels the handler (``handler_cancellation``), which closes the stream and so cancels the
gRPC call, which cancels the Triton request — except for a streamed chat completion, which is
resumable (``_resume``): its generation goes on for a grace period, waiting for the client to
reopen it with ``GET /v1/chat/completions/{id}/stream``, and is cancelled only then.

The pump (``pump``) turns the orchestrator's messages into an endpoint's chunks (its ``Shape``)
and writes them to a ``Sink``: an SSE response, a resumable stream, or a WebSocket (``_ws``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web
from opentelemetry import trace

from tokenrelay._readahead import ReadAhead
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._choices import Answer, Piece, chat_logprobs
from tokenrelay.edge._middlewares import error_body
from tokenrelay.edge._request import budget, read_json
from tokenrelay.edge._sse import SSEWriter
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, STREAMS, UPSTREAM
from tokenrelay.edge._stream import ResumableStream, new_stream_id
from tokenrelay.errors import GenerationFailed, RelayError, UpstreamUnavailable
from tokenrelay.generation import Usage
from tokenrelay.logs import bind
from tokenrelay.tenancy import ANONYMOUS, current_caller
from tokenrelay.tracing import inject
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.wire import usage_to_pb

__all__ = ["Opened", "Shape", "Sink", "open_answer", "pump", "routes"]

routes = web.RouteTableDef()
log = logging.getLogger(__name__)

F = TypeVar("F")


class Shape(Protocol):
    """How one endpoint spells its answer (of ``n`` choices)."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def n(self) -> int: ...

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]: ...
    def piece(self, piece: Piece) -> dict[str, Any]: ...
    def end(self, index: int, finish: str) -> dict[str, Any]: ...
    def usage(self, usage: pb.Usage) -> dict[str, Any]: ...
    def whole(self, answers: list[Answer], usage: pb.Usage) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class _Chat:
    id: str
    created: int
    model: str
    with_usage: bool
    n: int = 1
    logprobs: bool = False

    def _chunk(self, delta: dict[str, Any], index: int = 0, **fields: Any) -> dict[str, Any]:
        return oa.chat_chunk(
            self.id, self.created, self.model, delta, None, self.with_usage, index, **fields
        )

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]:
        chunks = [self._chunk({"role": "assistant", "content": ""}, i) for i in range(self.n)]
        if retrieval is not None:
            chunks[0]["retrieval"] = retrieval
        return chunks

    def piece(self, piece: Piece) -> dict[str, Any]:
        index = piece.index
        text, calls, logprobs = piece.take()
        entries = chat_logprobs(logprobs) if self.logprobs else None
        return self._chunk(Piece.chat_delta(text, calls), index, logprobs=entries)

    def end(self, index: int, finish: str) -> dict[str, Any]:
        return oa.chat_chunk(self.id, self.created, self.model, {}, finish, self.with_usage, index)

    def usage(self, usage: pb.Usage) -> dict[str, Any]:
        chunk = oa.chat_chunk(self.id, self.created, self.model, {}, None, True)
        chunk["choices"] = []
        chunk["usage"] = oa.usage(usage)
        return chunk

    def whole(self, answers: list[Answer], usage: pb.Usage) -> dict[str, Any]:
        choices = [a.chat(_finish(a.end), self.logprobs) for a in answers]
        return oa.chat_completion(self.id, self.created, self.model, choices, usage)


@dataclass(frozen=True, slots=True)
class _Completion:
    id: str
    created: int
    model: str
    with_usage: bool
    n: int = 1
    logprobs: bool = False
    # Characters of each choice's text so far: logprobs' text_offset counts from its start.
    offsets: dict[int, int] = field(default_factory=dict)

    def opening(self, retrieval: dict[str, Any] | None) -> list[dict[str, Any]]:
        if retrieval is None:
            return []
        chunk = oa.completion_chunk(self.id, self.created, self.model, "", None)
        chunk["retrieval"] = retrieval
        return [chunk]

    def piece(self, piece: Piece) -> dict[str, Any]:
        index = piece.index
        text, _, logprobs = piece.take()
        entries = None
        if self.logprobs:
            offset = self.offsets.get(index, 0)
            entries = Piece.completion_logprobs(logprobs, offset)
            self.offsets[index] = offset + len(text)  # the next piece starts after its text
        return oa.completion_chunk(self.id, self.created, self.model, text, None, index, entries)

    def end(self, index: int, finish: str) -> dict[str, Any]:
        return oa.completion_chunk(self.id, self.created, self.model, "", finish, index)

    def usage(self, usage: pb.Usage) -> dict[str, Any]:
        return oa.completion(self.id, self.created, self.model, [], usage)

    def whole(self, answers: list[Answer], usage: pb.Usage) -> dict[str, Any]:
        choices = [a.completion(_finish(a.end), self.logprobs) for a in answers]
        return oa.completion(self.id, self.created, self.model, choices, usage)


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


def _genai_response(model: str, ends: list[pb.StreamEnd], usage: pb.Usage) -> dict[str, Any]:
    return {
        "gen_ai.response.model": model,
        "gen_ai.response.finish_reasons": [oa.finish_reason(e) or "cancelled" for e in ends],
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
    }


def _finish(end: pb.StreamEnd | None) -> str:
    finish = oa.finish_reason(end) if end is not None else None
    if finish is None:
        raise UpstreamUnavailable("The inference server cancelled the generation.")
    return finish


def _total(ends: list[pb.StreamEnd]) -> pb.Usage:
    """The request's usage: the prompt once, every choice's completion tokens, and the prompts
    of every continuation (each in its own choice's end only)."""
    if not ends:
        return pb.Usage()
    first = ends[0]
    prompt = first.usage.prompt_tokens - first.continued.usage.prompt_tokens
    prompt += sum(e.continued.usage.prompt_tokens for e in ends)
    return usage_to_pb(Usage(prompt, sum(e.usage.completion_tokens for e in ends)))


async def _next(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
) -> pb.GenerateStreamResponse:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        raise GenerationFailed("The answer ended unexpectedly.") from None


class Sink(Protocol[F]):
    """Where a streamed answer's events go, in order: an SSE response (``SSEWriter``), a
    resumable stream that outlives its connection (``_resume.ResumableStream``), or one
    generation's messages on a WebSocket (``_ws``). ``frame`` spells one chunk; ``write`` sends
    several at once."""

    def frame(self, payload: dict[str, Any]) -> F: ...
    async def write(self, frames: list[F]) -> None: ...
    async def ping(self) -> None: ...
    async def fail(self, body: dict[str, Any]) -> None:
        """The error (an OpenAI error body), then the end."""
        ...

    async def done(self) -> None: ...


async def _wait(
    reader: ReadAhead[pb.GenerateStreamResponse], sink: Sink[F], interval_s: float
) -> list[pb.GenerateStreamResponse]:
    """The messages that arrive next; pings the sink while none does."""
    while True:
        try:
            async with asyncio.timeout(interval_s):
                taken = await reader.take()
        except TimeoutError:
            await sink.ping()
            continue
        if not taken:
            raise GenerationFailed("The answer ended unexpectedly.")
        return taken


def _continued(ends: list[pb.StreamEnd]) -> pb.Continued | None:
    """How the answer outlived its nodes, over all its choices (None: it did not)."""
    continued = [e.continued for e in ends if e.HasField("continued")]
    if not continued:
        return None
    prompt = sum(c.usage.prompt_tokens for c in continued)
    completion = sum(c.usage.completion_tokens for c in continued)
    return pb.Continued(
        count=sum(c.count for c in continued), usage=usage_to_pb(Usage(prompt, completion))
    )


def _with_continued(chunk: dict[str, Any], continued: pb.Continued | None) -> dict[str, Any]:
    """``chunk`` with the ``continued`` extension when the answer outlived its node."""
    if continued is not None:
        chunk["continued"] = oa.continued_json(continued)
    return chunk


async def pump(
    sink: Sink[F],
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: Shape,
    first: pb.GenerateStreamResponse,
    include_usage: bool,
    retrieval: dict[str, Any] | None,
    keepalive_s: float,
) -> None:
    """The orchestrator's ``messages`` (``first`` already read) as ``shape``'s chunks into
    ``sink``, then its end (``done``), or the error that ended them (``fail``: the usage so far
    first, when asked for). Does not close ``messages``."""
    # The orchestrator's messages are read ahead (a bounded few: a slow client still slows the
    # reading), so that messages that arrive together go out as one event, in one write; nothing
    # waits for company, so the first token is never delayed (when the client or the loop is
    # slower than the model, several deltas pile up and cost one event instead of one each).
    # Consecutive messages of one choice merge; a message of another choice starts a new event.
    reader = ReadAhead(messages, limit=32)
    reader.start()
    frames = [sink.frame(chunk) for chunk in shape.opening(retrieval)]
    piece = Piece()
    ends: list[pb.StreamEnd] = []

    def flush() -> None:
        if piece:
            frames.append(sink.frame(shape.piece(piece)))

    try:
        batch = [first]
        while True:
            for message in batch:
                if message.index != piece.index:
                    flush()
                    piece.index = message.index
                piece.add(message)
                if message.HasField("end"):
                    flush()
                    end = message.end
                    ends.append(end)
                    chunk = shape.end(message.index, _finish(end))
                    frames.append(sink.frame(_with_continued(chunk, _continued([end]))))
                    if len(ends) == shape.n:
                        break
            if len(ends) == shape.n:
                usage = _total(ends)
                trace.get_current_span().set_attributes(_genai_response(shape.model, ends, usage))
                if include_usage:
                    chunk = _with_continued(shape.usage(usage), _continued(ends))
                    frames.append(sink.frame(chunk))
                await sink.write(frames)
                break
            batch = reader.ready()
            if not batch:
                flush()
                await sink.write(frames)
                frames = []
                batch = await _wait(reader, sink, keepalive_s)
    except RelayError as exc:
        flush()
        if include_usage and exc.usage is not None:  # what was generated before the error
            frames.append(sink.frame(shape.usage(usage_to_pb(exc.usage))))
        await sink.write(frames)
        await sink.fail(error_body(exc))
        return
    finally:
        await reader.close()
    await sink.done()


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
    kind = _Chat if chat else _Completion
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
    """A streamed answer that outlives this connection (``_resume``): the generation runs in a
    task of its own, which owns ``messages`` from here on; this connection is its first client."""
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
            usage = _total(ends)
            answer = shape.whole([answers[i] for i in sorted(answers)], usage)
            if retrieval is not None:
                answer["retrieval"] = retrieval
            continued = _continued(ends)
            if continued is not None:
                _with_continued(answer, continued)
                headers["x-tokenrelay-continued"] = str(continued.count)
            span.set_attributes(_genai_response(model, ends, usage))
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
    """A streamed chat completion reopened after its connection dropped (``_resume``): the
    events after ``Last-Event-ID`` (all without it), then the rest as they come."""
    request.app[METRICS].resumes.inc()
    return await request.app[STREAMS].resume(request, request.match_info["id"], _owner())


@routes.post("/v1/chat/completions/{id}/cancel")
async def cancel_chat_completion(request: web.Request) -> web.Response:
    """Stop a streamed chat completion's generation now (its connection may be gone already)."""
    stream_id = request.match_info["id"]
    request.app[STREAMS].cancel(stream_id, _owner())
    return web.json_response({"id": stream_id, "object": "chat.completion", "cancelled": True})
