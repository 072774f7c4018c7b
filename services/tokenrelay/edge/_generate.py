"""The generation endpoints: ``/v1/chat/completions`` and ``/v1/completions``, how each spells
its answer, and the SSE pump.

Each OpenAI request becomes one ``GenerateStream`` call to the orchestrator. A streaming answer's
headers go out only with the first message from the orchestrator, so an error before any token
(bad request, no node, first-token timeout) is still a plain HTTP error with the right status.
The call's deadline is the client's budget (``_request.budget``). When the client goes away
aiohttp cancels the handler (``handler_cancellation``), which closes the stream and so cancels the
gRPC call, which cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from opentelemetry import trace

from tokenrelay._readahead import ReadAhead
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._choices import Answer, Piece, chat_logprobs
from tokenrelay.edge._errors import error_body
from tokenrelay.edge._request import budget, read_json
from tokenrelay.edge._sse import SSEWriter
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, UPSTREAM
from tokenrelay.errors import GenerationFailed, RelayError, UpstreamUnavailable
from tokenrelay.logs import bind
from tokenrelay.tracing import inject
from tokenrelay.v1 import generation_pb2 as pb

__all__ = ["routes"]

routes = web.RouteTableDef()


class _Shape(Protocol):
    """How one endpoint spells its answer."""

    @property
    def model(self) -> str: ...

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
            self.offsets[index] = offset + sum(len(e.token) for e in logprobs)
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
    """The request's usage: the prompt once, every choice's completion tokens."""
    prompt = ends[0].usage.prompt_tokens if ends else 0
    completion = sum(e.usage.completion_tokens for e in ends)
    return pb.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _next(
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
) -> pb.GenerateStreamResponse:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        raise GenerationFailed("The answer ended unexpectedly.") from None


async def _wait(
    reader: ReadAhead[pb.GenerateStreamResponse], sse: SSEWriter, interval_s: float
) -> list[pb.GenerateStreamResponse]:
    """The messages that arrive next; writes ``: ping`` comments while none does."""
    while True:
        try:
            async with asyncio.timeout(interval_s):
                taken = await reader.take()
        except TimeoutError:
            await sse.ping()
            continue
        if not taken:
            raise GenerationFailed("The answer ended unexpectedly.")
        return taken


async def _stream(
    request: web.Request,
    messages: AsyncGenerator[pb.GenerateStreamResponse, None],
    shape: _Shape,
    first: pb.GenerateStreamResponse,
    headers: dict[str, str],
    include_usage: bool,
    retrieval: dict[str, Any] | None,
    n: int,
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    sse = await SSEWriter.open(request, headers)
    streams = request.app[METRICS].streams
    streams.inc()
    # The orchestrator's messages are read ahead (a bounded few: a slow client still slows the
    # reading), so that messages that arrive together go out as one event, in one write; nothing
    # waits for company, so the first token is never delayed (when the client or the loop is
    # slower than the model, several deltas pile up and cost one event instead of one each).
    # Consecutive messages of one choice merge; a message of another choice starts a new event.
    reader = ReadAhead(messages, limit=32)
    reader.start()
    frames = [sse.frame(chunk) for chunk in shape.opening(retrieval)]
    piece = Piece()
    ends: list[pb.StreamEnd] = []

    def flush() -> None:
        if piece:
            frames.append(sse.frame(shape.piece(piece)))

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
                    ends.append(message.end)
                    frames.append(sse.frame(shape.end(message.index, _finish(message.end))))
                    if len(ends) == n:
                        break
            if len(ends) == n:
                usage = _total(ends)
                trace.get_current_span().set_attributes(_genai_response(shape.model, ends, usage))
                if include_usage:
                    frames.append(sse.frame(shape.usage(usage)))
                await sse.write(frames)
                break
            batch = reader.ready()
            if not batch:
                flush()
                await sse.write(frames)
                frames = []
                batch = await _wait(reader, sse, settings.keepalive_interval_s)
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
        try:
            first = await _next(messages)
            model = first.start.served_by.model or parsed.request.model
            kind = _Chat if chat else _Completion
            prefix = "chatcmpl-" if chat else "cmpl-"
            shape = kind(
                prefix + request_id,
                int(time.time()),
                model,
                parsed.include_usage,
                parsed.n,
                parsed.logprobs,
            )
            headers = {}
            if first.start.served_by.fallback:
                headers["x-tokenrelay-fallback"] = model
            retrieval = None
            if first.start.HasField("retrieval"):
                retrieval = oa.retrieval_json(first.start.retrieval)
                headers["x-tokenrelay-retrieval"] = retrieval["status"]
            if parsed.stream:
                return await _stream(
                    request,
                    messages,
                    shape,
                    first,
                    headers,
                    parsed.include_usage,
                    retrieval,
                    parsed.n,
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
            span.set_attributes(_genai_response(model, ends, usage))
            return web.json_response(answer, headers=headers)
        finally:
            await messages.aclose()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)
