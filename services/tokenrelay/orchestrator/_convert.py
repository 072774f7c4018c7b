"""Protobuf ↔ domain conversion: protobuf types stop here."""

from __future__ import annotations

from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import (
    ChatMessage,
    Chunk,
    Continued,
    FinishReason,
    GenerationRequest,
    OnFailure,
    RetrievalOptions,
    RetrievalReport,
    RetrievalStatus,
    Role,
    Sampling,
    StreamStart,
    Usage,
)
from tokenrelay.orchestrator._breaker import BreakerState
from tokenrelay.orchestrator._pool import NodeStatus
from tokenrelay.orchestrator._relay import ModelStatus
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import retrieval_pb2 as rpb

__all__ = [
    "chunk_to_pb",
    "continued_to_pb",
    "finish_to_pb",
    "model_to_pb",
    "node_to_pb",
    "report_to_pb",
    "request_from_pb",
    "served_by_to_pb",
    "start_to_pb",
    "usage_to_pb",
]

_ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
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


def request_from_pb(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> GenerationRequest:
    """Raises ``InvalidRequest`` for a role the API does not define."""
    messages = None
    prompt = None
    kind = request.WhichOneof("input")
    if kind == "chat":
        converted = []
        for i, m in enumerate(request.chat.messages):
            role = _ROLES.get(m.role)
            if role is None:
                raise InvalidRequest(
                    f"messages[{i}].role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT.",
                    f"messages[{i}].role",
                )
            converted.append(ChatMessage(role, m.content))
        messages = tuple(converted)
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
    )


def served_by_to_pb(start: StreamStart) -> pb.ServedBy:
    return pb.ServedBy(model=start.model, node=start.node, fallback=start.fallback)


def start_to_pb(start: StreamStart) -> pb.StreamStart:
    message = pb.StreamStart(request_id=start.request_id, served_by=served_by_to_pb(start))
    if start.retrieval is not None:
        message.retrieval.CopyFrom(report_to_pb(start.retrieval))
    return message


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def continued_to_pb(continued: Continued) -> pb.Continued:
    return pb.Continued(count=continued.count, usage=usage_to_pb(continued.usage))


def finish_to_pb(reason: FinishReason) -> pb.FinishReason.ValueType:
    return _FINISH[reason]


def chunk_to_pb(chunk: Chunk) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(text=chunk.text)
    if chunk.start is not None:
        message.start.CopyFrom(start_to_pb(chunk.start))
    if chunk.end is not None:
        message.end.finish_reason = finish_to_pb(chunk.end.finish_reason)
        message.end.usage.CopyFrom(usage_to_pb(chunk.end.usage))
        if chunk.end.continued is not None:
            message.end.continued.CopyFrom(continued_to_pb(chunk.end.continued))
    return message


def model_to_pb(status: ModelStatus) -> pb.Model:
    return pb.Model(
        id=status.spec.id,
        owned_by=status.spec.owned_by,
        context_window=status.spec.context_window,
        ready=status.ready,
        created=status.created,
        kind=pb.MODEL_KIND_CHAT,
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
