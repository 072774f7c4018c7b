"""``tokenrelay.v1.GenerationService``: decode the protobuf, call the relay, encode each chunk.

The gRPC border (span, log fields, error mapping) is ``_border.BorderInterceptor``'s.

With the protobuf ↔ domain conversion (``request_from_pb``, ``chunk_to_pb``, …): protobuf types
stop here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc

from tokenrelay.config import Embeddings
from tokenrelay.errors import GenerationFailed, InvalidRequest
from tokenrelay.generation import (
    ChatMessage,
    Chunk,
    Continued,
    FinishReason,
    GenerationRequest,
    OnFailure,
    ResponseFormat,
    ResponseFormatType,
    RetrievalOptions,
    RetrievalReport,
    RetrievalStatus,
    Role,
    Sampling,
    StreamStart,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from tokenrelay.orchestrator._admission import Slots
from tokenrelay.orchestrator._border import current_identity
from tokenrelay.orchestrator._pool import BreakerState, NodePool, NodeStatus
from tokenrelay.orchestrator._relay import ModelStatus, Relay
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.wire import usage_to_pb

__all__ = [
    "GenerationServicer",
    "chunk_to_pb",
    "continued_to_pb",
    "finish_to_pb",
    "logprobs_to_pb",
    "model_to_pb",
    "node_to_pb",
    "report_to_pb",
    "request_from_pb",
    "served_by_to_pb",
    "start_to_pb",
]

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_TOOL_CHOICE = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.TOOL_CHOICE_MODE_FUNCTION: ToolChoiceMode.FUNCTION,
}
_RESPONSE_FORMAT = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}


_POLICY = {
    rpb.RETRIEVAL_FAILURE_POLICY_UNSPECIFIED: None,
    rpb.RETRIEVAL_FAILURE_POLICY_ANSWER_WITHOUT_CONTEXT: OnFailure.ANSWER,
    rpb.RETRIEVAL_FAILURE_POLICY_FAIL: OnFailure.FAIL,
}
_RETRIEVAL_STATUS = {
    RetrievalStatus.USED: rpb.RETRIEVAL_STATUS_USED,
    RetrievalStatus.EMPTY: rpb.RETRIEVAL_STATUS_EMPTY,
    RetrievalStatus.FAILED: rpb.RETRIEVAL_STATUS_FAILED,
}


def retrieval_from_pb(options: rpb.RetrievalOptions) -> RetrievalOptions:
    if options.on_failure not in _POLICY:
        raise InvalidRequest(
            "retrieval.on_failure is not a defined policy.", "retrieval.on_failure"
        )
    return RetrievalOptions(
        collection=options.collection,
        top_k=options.top_k if options.HasField("top_k") else None,
        min_score=options.min_score if options.HasField("min_score") else None,
        on_failure=_POLICY[options.on_failure],
    )


def report_to_pb(report: RetrievalReport) -> rpb.RetrievalReport:
    return rpb.RetrievalReport(
        status=_RETRIEVAL_STATUS[report.status],
        message=report.message,
        citations=[
            rpb.Citation(
                number=c.number,
                chunk_id=c.chunk_id,
                document_id=c.document_id,
                source=c.source,
                index=c.index,
                score=c.score,
            )
            for c in report.citations
        ],
    )


def _opt(message: pb.SamplingParams, name: str) -> float | int | None:
    value: float | int | None = getattr(message, name) if message.HasField(name) else None  # type: ignore[arg-type]
    return value


def _message_from_pb(message: pb.ChatMessage, i: int) -> ChatMessage:
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(
            f"messages[{i}].role must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL.",
            f"messages[{i}].role",
        )
    return ChatMessage(
        role,
        message.content,
        tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls),
        message.tool_call_id,
    )


def _tool_choice_from_pb(choice: pb.ToolChoice) -> ToolChoice:
    mode = _TOOL_CHOICE.get(choice.mode)
    if mode is None:
        raise InvalidRequest("tool_choice.mode is not a defined mode.", "tool_choice")
    return ToolChoice(mode, choice.function)


def _response_format_from_pb(response_format: pb.ResponseFormat) -> ResponseFormat:
    kind = _RESPONSE_FORMAT.get(response_format.type)
    if kind is None:
        raise InvalidRequest("response_format.type is not a defined type.", "response_format")
    return ResponseFormat(kind, response_format.schema)


def request_from_pb(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> GenerationRequest:
    """Raises ``InvalidRequest`` for a role, tool choice or response format the API does not
    define."""
    messages = None
    prompt = None
    kind = request.WhichOneof("input")
    if kind == "chat":
        messages = tuple(_message_from_pb(m, i) for i, m in enumerate(request.chat.messages))
    elif kind == "prompt":
        prompt = request.prompt
    s = request.sampling
    max_tokens, top_k, seed = (_opt(s, n) for n in ("max_tokens", "top_k", "seed"))
    sampling = Sampling(
        max_tokens=None if max_tokens is None else int(max_tokens),
        temperature=_opt(s, "temperature"),
        top_p=_opt(s, "top_p"),
        top_k=None if top_k is None else int(top_k),
        seed=None if seed is None else int(seed),
        stop=tuple(s.stop),
        presence_penalty=_opt(s, "presence_penalty"),
        frequency_penalty=_opt(s, "frequency_penalty"),
        top_logprobs=s.top_logprobs if s.HasField("top_logprobs") else None,
        logit_bias=dict(s.logit_bias),
    )
    return GenerationRequest(
        model=request.model,
        messages=messages,
        prompt=prompt,
        sampling=sampling,
        request_id=request.request_id,
        labels=dict(request.labels),
        retrieval=retrieval_from_pb(request.retrieval) if request.HasField("retrieval") else None,
        stream_interval_ms=(
            request.stream_interval_ms
            if isinstance(request, pb.GenerateStreamRequest)
            and request.HasField("stream_interval_ms")
            else None
        ),
        tools=tuple(Tool(t.name, t.description, t.parameters) for t in request.tools),
        tool_choice=_tool_choice_from_pb(request.tool_choice),
        parallel_tool_calls=(
            request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        ),
        response_format=_response_format_from_pb(request.response_format),
        n=request.n if request.HasField("n") else 1,
    )


def served_by_to_pb(start: StreamStart) -> pb.ServedBy:
    return pb.ServedBy(model=start.model, node=start.node, fallback=start.fallback)


def start_to_pb(start: StreamStart) -> pb.StreamStart:
    message = pb.StreamStart(request_id=start.request_id, served_by=served_by_to_pb(start))
    if start.retrieval is not None:
        message.retrieval.CopyFrom(report_to_pb(start.retrieval))
    return message


def continued_to_pb(continued: Continued) -> pb.Continued:
    return pb.Continued(count=continued.count, usage=usage_to_pb(continued.usage))


def finish_to_pb(reason: FinishReason) -> pb.FinishReason.ValueType:
    return _FINISH[reason]


def logprobs_to_pb(logprobs: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=entry.token,
            logprob=entry.logprob,
            top_logprobs=[pb.Logprob(token=t.token, logprob=t.logprob) for t in entry.top],
        )
        for entry in logprobs
    ]


def chunk_to_pb(chunk: Chunk) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(text=chunk.text, index=chunk.index)
    for call in chunk.tool_calls:
        message.tool_calls.add(
            index=call.index, id=call.id, name=call.name, arguments=call.arguments
        )
    if chunk.logprobs:
        message.logprobs.extend(logprobs_to_pb(chunk.logprobs))
    if chunk.start is not None:
        message.start.CopyFrom(start_to_pb(chunk.start))
    if chunk.end is not None:
        message.end.finish_reason = finish_to_pb(chunk.end.finish_reason)
        message.end.usage.CopyFrom(usage_to_pb(chunk.end.usage))
        if chunk.end.continued is not None:
            message.end.continued.CopyFrom(continued_to_pb(chunk.end.continued))
    return message


def model_to_pb(status: ModelStatus) -> pb.Model:
    spec = status.spec
    return pb.Model(
        id=spec.id,
        owned_by=spec.owned_by,
        context_window=spec.context_window,
        ready=status.ready,
        created=status.created,
        kind=pb.MODEL_KIND_CHAT,
        capabilities=pb.Capabilities(
            tool_parser=spec.tool_parser,
            structured_outputs=spec.structured_outputs,
            logprobs=spec.logprobs,
            logit_bias=spec.logit_bias,
        ),
    )


_BREAKER = {
    BreakerState.CLOSED: pb.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: pb.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN,
}


def node_to_pb(status: NodeStatus) -> pb.NodeStatus:
    return pb.NodeStatus(
        address=status.node,
        breaker=_BREAKER[status.breaker],
        in_flight=status.in_flight,
        ready_models=status.ready_models,
    )


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
