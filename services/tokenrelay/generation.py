"""Domain types of a generation and the seam to a source of tokens.

These plain dataclasses are what the orchestrator's logic works with; protobuf types stop at the
gRPC border (``orchestrator/_convert.py``).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ChatMessage",
    "Chunk",
    "Citation",
    "Continued",
    "Delta",
    "FinishReason",
    "GenerationRequest",
    "OnFailure",
    "RetrievalOptions",
    "RetrievalReport",
    "RetrievalStatus",
    "Role",
    "Sampling",
    "StreamEnd",
    "StreamStart",
    "TokenSource",
    "Usage",
    "merge_deltas",
]


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class Role(enum.StrEnum):
    """Who wrote a chat message (the values are the chat templates' role names)."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class OnFailure(enum.StrEnum):
    """What a request wants when its retrieval stage fails: answer without context, or fail."""

    ANSWER = "answer"
    FAIL = "fail"


class RetrievalStatus(enum.StrEnum):
    USED = "used"  # chunks were placed in the prompt
    EMPTY = "empty"  # nothing relevant enough was found
    FAILED = "failed"  # the stage failed; answered without context, by policy


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Sampling:
    """Decoding parameters; ``None`` means the model's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def to_engine_json(self) -> dict[str, object]:
        """The set fields, named as vLLM's ``SamplingParams`` names them."""
        out: dict[str, object] = {}
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stop:
            out["stop"] = list(self.stop)
        return out


@dataclass(frozen=True, slots=True)
class RetrievalOptions:
    """A request's ask for retrieval-augmented generation; ``None``: the configured default."""

    collection: str
    top_k: int | None = None
    min_score: float | None = None
    on_failure: OnFailure | None = None


@dataclass(frozen=True, slots=True)
class Citation:
    """A retrieved chunk placed in the prompt as ``[number]``."""

    number: int
    chunk_id: str
    document_id: str
    source: str
    index: int
    score: float


@dataclass(frozen=True, slots=True)
class RetrievalReport:
    """What the retrieval stage did (``message`` says why it failed)."""

    status: RetrievalStatus
    citations: tuple[Citation, ...] = ()
    message: str = ""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request, as the caller stated it (before the chat template is applied)."""

    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    retrieval: RetrievalOptions | None = None
    # Tokens arriving within this many ms of the previous chunk ride in the next one; None:
    # the model's default.
    stream_interval_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of a generation as a token source reports it.

    ``output_tokens`` counts the tokens behind ``text`` (text may be empty while a token is held
    back, e.g. as a possible start of a stop sequence). ``prompt_tokens`` is set when the source
    knows it. ``finish_reason`` is set on the last delta only.
    """

    text: str
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: FinishReason | None = None


def merge_deltas(deltas: Sequence[Delta]) -> Delta:
    """Consecutive deltas of one answer as one (text joined, tokens summed, the last one's
    finish reason)."""
    if len(deltas) == 1:
        return deltas[0]
    prompt_tokens = [d.prompt_tokens for d in deltas if d.prompt_tokens is not None]
    return Delta(
        "".join(d.text for d in deltas),
        sum(d.output_tokens for d in deltas),
        prompt_tokens[-1] if prompt_tokens else None,
        deltas[-1].finish_reason,
    )


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Who answers: the request's id, the catalog model and node that serve it, whether a
    fallback answers, and what the retrieval stage did."""

    request_id: str
    model: str
    node: str
    fallback: bool = False
    retrieval: RetrievalReport | None = None


@dataclass(frozen=True, slots=True)
class Continued:
    """How an answer outlived its node: ``count`` continuations on other nodes, and the tokens
    they took (``usage``: each one's prompt — the request's prompt plus the text so far — and
    its completion), which the stream's usage includes."""

    count: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How the answer ended; ``usage`` counts every attempt that produced it (``continued``
    says how much of it went to continuations, when there were any)."""

    finish_reason: FinishReason
    usage: Usage
    continued: Continued | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a stream: the text since the previous one; ``start`` on the first only,
    ``end`` on the last only."""

    text: str
    start: StreamStart | None = None
    end: StreamEnd | None = None


class TokenSource(Protocol):
    """A place that turns a prompt into a stream of deltas (one Triton node, or a fake).

    ``generate`` yields deltas as they are produced; the last one has ``finish_reason`` set. It
    raises ``UpstreamUnavailable`` when the source cannot be reached, ``UpstreamTimeout`` when the
    source's own deadline expires and ``GenerationFailed`` when the model reports an error. Closing
    or cancelling the iterator cancels the generation at the source. Each call is independent;
    calls may run concurrently.
    """

    @property
    def name(self) -> str: ...

    def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        """``headers``: metadata to send with the request (the trace context)."""
        ...

    async def ready(self, model: str) -> bool:
        """Whether the source can serve ``model`` now. Never raises; safe to call repeatedly."""
        ...

    async def close(self) -> None:
        """Release connections. Safe to call more than once."""
        ...
