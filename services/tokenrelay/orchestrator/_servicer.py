"""``tokenrelay.v1.GenerationService``: decode the protobuf, call the relay, encode each chunk.

The gRPC border (span, log fields, error mapping) is ``_border.BorderInterceptor``'s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc

from tokenrelay.config import Embeddings
from tokenrelay.errors import GenerationFailed
from tokenrelay.generation import Chunk, Continued, StreamStart, TokenLogprob, Usage
from tokenrelay.orchestrator._admission import Slots
from tokenrelay.orchestrator._border import current_identity
from tokenrelay.orchestrator._convert import (
    chunk_to_pb,
    continued_to_pb,
    finish_to_pb,
    logprobs_to_pb,
    model_to_pb,
    node_to_pb,
    report_to_pb,
    request_from_pb,
    served_by_to_pb,
)
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.wire import usage_to_pb

__all__ = ["GenerationServicer"]

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _budget(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.0)


async def _announce(context: Context, start: StreamStart) -> None:
    """Initial metadata: says when a fallback model answers."""
    if start.fallback:
        await context.send_initial_metadata((("tokenrelay-fallback", start.model),))


def _say_continued(context: Context, count: int) -> None:
    """Trailing metadata: says when the answer was continued on another node (``count`` times,
    over all its choices)."""
    if count:
        context.set_trailing_metadata((("tokenrelay-continued", str(count)),))


class _Answer:
    """One choice of a unary answer, put together from its chunks."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.texts: list[str] = []
        self.calls: dict[int, pb.ToolCall] = {}
        self.logprobs: list[TokenLogprob] = []
        self.finish: pb.FinishReason.ValueType = pb.FINISH_REASON_UNSPECIFIED
        self.completion_tokens = 0

    def add(self, chunk: Chunk) -> None:
        self.texts.append(chunk.text)
        for piece in chunk.tool_calls:
            call = self.calls.setdefault(piece.index, pb.ToolCall())
            call.id = call.id or piece.id
            call.name = call.name or piece.name
            call.arguments += piece.arguments
        self.logprobs.extend(chunk.logprobs)
        if chunk.end is not None:
            self.finish = finish_to_pb(chunk.end.finish_reason)
            self.completion_tokens = chunk.end.usage.completion_tokens

    def to_pb(self) -> pb.Choice:
        return pb.Choice(
            index=self.index,
            text="".join(self.texts),
            tool_calls=[self.calls[i] for i in sorted(self.calls)],
            finish_reason=self.finish,
            logprobs=logprobs_to_pb(tuple(self.logprobs)),
        )


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(
        self,
        relay: Relay,
        pool: NodePool,
        admission: Slots,
        embeddings: Embeddings | None = None,
    ) -> None:
        """``embeddings``: the embedding model, listed beside the catalog's when it serves."""
        self._relay = relay
        self._pool = pool
        self._admission = admission
        self._embeddings = embeddings

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        chunks = self._relay.stream(
            request_from_pb(request), _budget(context), current_identity.get()
        )
        continued = 0
        async with aclosing(chunks):  # a cancelled call closes the relay, which cancels Triton
            async for chunk in chunks:
                if chunk.start is not None:
                    await _announce(context, chunk.start)
                if chunk.end is not None and chunk.end.continued is not None:
                    continued += chunk.end.continued.count
                    _say_continued(context, continued)
                yield chunk_to_pb(chunk)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        generation = request_from_pb(request)
        answers: dict[int, _Answer] = {}  # by choice index, as they come (n is checked later)
        prompt_tokens = 0
        continued: list[Continued] = []
        chunks = self._relay.stream(generation, _budget(context), current_identity.get())
        async with aclosing(chunks):
            async for chunk in chunks:
                answers.setdefault(chunk.index, _Answer(chunk.index)).add(chunk)
                if chunk.start is not None:
                    await _announce(context, chunk.start)
                    response.request_id = chunk.start.request_id
                    response.served_by.CopyFrom(served_by_to_pb(chunk.start))
                    if chunk.start.retrieval is not None:
                        response.retrieval.CopyFrom(report_to_pb(chunk.start.retrieval))
                if chunk.end is not None:
                    # The prompt once (every choice's end counts it), and each continuation's
                    # own prompt (in its choice's end only).
                    prompt_tokens = chunk.end.usage.prompt_tokens
                    if chunk.end.continued is not None:
                        continued.append(chunk.end.continued)
                        prompt_tokens -= chunk.end.continued.usage.prompt_tokens
        if len(answers) != generation.n or any(not a.finish for a in answers.values()):
            raise GenerationFailed("The model ended without finishing its answer.")
        choices = [answers[i].to_pb() for i in sorted(answers)]
        first = choices[0]
        response.text = first.text
        response.finish_reason = first.finish_reason
        response.tool_calls.extend(first.tool_calls)
        response.logprobs.extend(first.logprobs)
        response.choices.extend(choices)
        completion_tokens = sum(answer.completion_tokens for answer in answers.values())
        prompt_tokens += sum(c.usage.prompt_tokens for c in continued)
        response.usage.CopyFrom(usage_to_pb(Usage(prompt_tokens, completion_tokens)))
        if continued:
            count = sum(c.count for c in continued)
            usage = Usage(
                sum(c.usage.prompt_tokens for c in continued),
                sum(c.usage.completion_tokens for c in continued),
            )
            response.continued.CopyFrom(continued_to_pb(Continued(count, usage)))
            _say_continued(context, count)
        return response

    def _models(self) -> list[pb.Model]:
        models = [model_to_pb(m) for m in self._relay.models()]
        if self._embeddings is not None:
            spec = self._embeddings
            models.append(
                pb.Model(
                    id=spec.id,
                    owned_by="tokenrelay",
                    ready=self._pool.ready(spec.id),
                    created=self._relay.created,
                    kind=pb.MODEL_KIND_EMBEDDING,
                )
            )
        return models

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self._models())

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        models = self._models()
        return pb.StatusResponse(
            serving=any(m.ready for m in models if m.kind == pb.MODEL_KIND_CHAT),
            nodes=[node_to_pb(n) for n in self._pool.status()],
            running=self._admission.running,
            queued=self._admission.queued,
            models=models,
        )
