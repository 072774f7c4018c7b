"""Domain types of a generation and the seam to a source of tokens.

These plain dataclasses are what the orchestrator's logic works with; protobuf types stop at the
gRPC border (``orchestrator/_servicer.py``).

Beyond text, a request may offer the model tools (``Tool``, with a ``ToolChoice``), constrain the
answer's form (``ResponseFormat``), ask for log probabilities (``Sampling.top_logprobs``) and for
several answers (``GenerationRequest.n``, each a *choice* with its own ``Chunk.index``). JSON
values that the orchestrator passes on without interpreting (a tool's parameter schema, a call's
arguments, a response schema) stay JSON text, as OpenAI carries them.
"""

from __future__ import annotations

import enum
import json
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
    "Logprob",
    "OnFailure",
    "ResponseFormat",
    "ResponseFormatType",
    "RetrievalOptions",
    "RetrievalReport",
    "RetrievalStatus",
    "Role",
    "Sampling",
    "StreamEnd",
    "StreamStart",
    "StructuredOutput",
    "TokenLogprob",
    "TokenSource",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolChoiceMode",
    "Usage",
    "merge_deltas",
]


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"  # the answer ends with tool calls


class Role(enum.StrEnum):
    """Who wrote a chat message (the values are the chat templates' role names)."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"  # the result of a tool call (``ChatMessage.tool_call_id`` names the call)


class OnFailure(enum.StrEnum):
    """What a request wants when its retrieval stage fails: answer without context, or fail."""

    ANSWER = "answer"
    FAIL = "fail"


class RetrievalStatus(enum.StrEnum):
    USED = "used"  # chunks were placed in the prompt
    EMPTY = "empty"  # nothing relevant enough was found
    FAILED = "failed"  # the stage failed; answered without context, by policy


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a function, as the model wrote it: ``arguments`` is JSON text (an object)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn. An assistant turn may call tools (``tool_calls``; its content may then be
    empty); a tool turn answers the call whose id is ``tool_call_id``."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is the JSON Schema of its arguments as JSON
    text ("" when it takes none)."""

    name: str
    description: str = ""
    parameters: str = ""


class ToolChoiceMode(enum.StrEnum):
    AUTO = "auto"  # the model decides
    NONE = "none"  # no call: the tools are not offered
    REQUIRED = "required"  # at least one call
    FUNCTION = "function"  # a call of ``ToolChoice.function``


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    function: str = ""  # with FUNCTION: the function that must be called


class ResponseFormatType(enum.StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # an instance of ``ResponseFormat.schema``


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: ResponseFormatType = ResponseFormatType.TEXT
    schema: str = ""  # with JSON_SCHEMA: the JSON Schema, as JSON text


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the text a model may produce: the fields of vLLM's
    ``StructuredOutputsParams`` that tokenrelay uses (set exactly one)."""

    schema: str = ""  # a JSON Schema, as JSON text (vLLM's ``json``)
    json_object: bool = False  # any JSON object
    choice: tuple[str, ...] = ()  # one of these strings

    def to_engine_json(self) -> str:
        """The ``structured_outputs`` value of ``sampling_parameters``: JSON text, as Triton's
        vLLM backend reads it (``StructuredOutputsParams(**json.loads(value))``)."""
        params: dict[str, object] = {}
        if self.schema:
            params["json"] = json.loads(self.schema)
        if self.json_object:
            params["json_object"] = True
        if self.choice:
            params["choice"] = list(self.choice)
        return json.dumps(params, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Sampling:
    """Decoding parameters; ``None`` means the model's default.

    ``top_logprobs`` asks for log probabilities: of each generated token, and of this many most
    likely tokens at each position (0: the generated token's only). ``logit_bias`` maps token ids
    to a bias added to their logits. ``structured`` is set by the orchestrator (from the
    request's response format or forced tool choice), never by callers directly, and so is
    ``stream_interval_ms``, which is not a sampling parameter: the stream interval the request
    is relayed at, passed to the model as a hint that it may merge that stream's tokens as well
    (``TritonNode``; 0: none).
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_logprobs: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    structured: StructuredOutput | None = None
    stream_interval_ms: int = 0

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
        if self.top_logprobs is not None:
            out["logprobs"] = self.top_logprobs
        if self.logit_bias:
            out["logit_bias"] = {str(token): bias for token, bias in self.logit_bias.items()}
        if self.structured is not None:
            out["structured_outputs"] = self.structured.to_engine_json()
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
    """One request, as the caller stated it (before the chat template is applied).

    ``tools`` (chat only) are offered to the model as ``tool_choice`` says; with
    ``parallel_tool_calls`` false an answer holds at most one call. ``n`` answers are generated
    (choices 0 to n-1), each with its own seed derived from ``sampling.seed``.
    """

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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    n: int = 1


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Logprob:
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log probability, and the most likely tokens at its position (most
    likely first; as many as the request asked for, the generated one among them if it is)."""

    token: str
    logprob: float
    top: tuple[Logprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of a generation as a token source reports it.

    ``output_tokens`` counts the tokens behind ``text`` (text may be empty while a token is held
    back, e.g. as a possible start of a stop sequence). ``prompt_tokens`` is set when the source
    knows it. ``finish_reason`` is set on the last delta only. ``logprobs`` (when asked for) has
    one entry per token behind the delta.
    """

    text: str
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


def merge_deltas(deltas: Sequence[Delta]) -> Delta:
    """Consecutive deltas of one answer as one (text joined, tokens summed, logprobs in order,
    the last one's finish reason)."""
    if len(deltas) == 1:
        return deltas[0]
    prompt_tokens = [d.prompt_tokens for d in deltas if d.prompt_tokens is not None]
    return Delta(
        "".join(d.text for d in deltas),
        sum(d.output_tokens for d in deltas),
        prompt_tokens[-1] if prompt_tokens else None,
        deltas[-1].finish_reason,
        tuple(entry for d in deltas for entry in d.logprobs),
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
    """How one choice ended; ``usage`` counts the prompt and that choice's completion tokens,
    over every attempt that produced it (``continued`` says how much of it went to
    continuations, when there were any)."""

    finish_reason: FinishReason
    usage: Usage
    continued: Continued | None = None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call as it is generated: the first piece of call ``index`` (0, 1, …
    within one answer) carries its ``id`` and ``name``, later ones more of its ``arguments``
    (JSON text; the pieces joined are the whole)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a stream: choice ``index``'s text since its previous chunk, pieces of its
    tool calls, and the log probabilities of the tokens behind them. ``start`` is on the
    stream's first chunk only; ``end`` on each choice's last chunk only (with n = 1: the
    stream's last)."""

    text: str
    start: StreamStart | None = None
    end: StreamEnd | None = None
    index: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


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
