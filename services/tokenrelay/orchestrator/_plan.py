"""From a caller's request to what is sent to a model: a ``Plan`` per catalog model that may answer.

``Planner.plans`` resolves the model in the catalog, validates the request against it, renders
the chat template and fills the model's defaults, once; the fallback model (if the catalog names
one) gets a plan of its own when the request fits it. Retrieval adds context to those plans
(``Planner.with_context``) instead of planning again, and a stream that lost its node goes on
from a continuation of its plan (``Planner.continuation``; never for a plan under a constraint,
see ``Plan.continuable``).

Tools and response formats are planned here too: the template offers the tools (unless
``tool_choice`` is none); a forced tool choice becomes a constraint on the answer (a JSON schema
of one call in the model's tool-call format), as does a JSON response format — both with bounds
where the schema has none (``_schemas.bounded``); and the plan says how its answer is read for
tool calls (``ToolPlan``).

Validation of a generation request against the catalog and the limits (``validate``), the first
step of a plan.

Every check raises ``InvalidRequest`` naming the field (``param``) in OpenAI's terms, so the edge
can pass the message through unchanged. Nothing reaches a model before this passes: what a model
cannot do (tools without a tool format, constrained decoding, logprobs, logit_bias — its catalog
entry says) is refused here, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenrelay.config import Limits, ModelSpec
from tokenrelay.errors import InvalidRequest, ModelNotFound
from tokenrelay.generation import (
    ChatMessage,
    GenerationRequest,
    ResponseFormatType,
    RetrievalReport,
    Role,
    Sampling,
    StructuredOutput,
    ToolChoiceMode,
)
from tokenrelay.orchestrator._schemas import bounded, parse_schema, precheck
from tokenrelay.orchestrator._tools import FORMATS, ToolCallParser, ToolFormat
from tokenrelay.templates import ChatTemplate

__all__ = ["Plan", "Planner", "ToolPlan", "validate"]

_ROLES = frozenset(Role)
# OpenAI's rule for function names.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_TOP_LOGPROBS = 20  # OpenAI's bound, and vLLM's default max_logprobs
_MAX_LOGIT_BIAS = 1024  # token ids one request may bias
_FORCED = frozenset({ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION})


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}; got {value}.", name)


def _check_sampling(sampling: Sampling, spec: ModelSpec, limits: Limits) -> None:
    if sampling.max_tokens is not None and not 1 <= sampling.max_tokens <= spec.context_window:
        raise InvalidRequest(
            f"'max_tokens' must be between 1 and {spec.context_window} (the model's context"
            f" window); got {sampling.max_tokens}.",
            "max_tokens",
        )
    _check_range("temperature", sampling.temperature, 0.0, 2.0)
    if sampling.top_p is not None and not (math.isfinite(sampling.top_p) and sampling.top_p > 0):
        raise InvalidRequest(f"'top_p' must be greater than 0; got {sampling.top_p}.", "top_p")
    _check_range("top_p", sampling.top_p, 0.0, 1.0)
    if sampling.top_k is not None and sampling.top_k < 0:
        raise InvalidRequest(f"'top_k' must be 0 or more; got {sampling.top_k}.", "top_k")
    _check_range("presence_penalty", sampling.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", sampling.frequency_penalty, -2.0, 2.0)
    if len(sampling.stop) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"'stop' may hold at most {limits.max_stop_sequences} sequences.", "stop"
        )
    for stop in sampling.stop:
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidRequest(
                f"Each stop sequence must have 1 to {limits.max_stop_chars} characters.", "stop"
            )
    if sampling.top_logprobs is not None:
        if not spec.logprobs:
            raise InvalidRequest(
                f"The model '{spec.id}' does not return log probabilities.", "logprobs"
            )
        if not 0 <= sampling.top_logprobs <= _MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"'top_logprobs' must be between 0 and {_MAX_TOP_LOGPROBS}.", "top_logprobs"
            )
    if sampling.logit_bias:
        if not spec.logit_bias:
            raise InvalidRequest(f"The model '{spec.id}' does not apply logit_bias.", "logit_bias")
        if len(sampling.logit_bias) > _MAX_LOGIT_BIAS:
            raise InvalidRequest(
                f"'logit_bias' may name at most {_MAX_LOGIT_BIAS} tokens.", "logit_bias"
            )
        for token, bias in sampling.logit_bias.items():
            if token < 0:
                raise InvalidRequest(
                    f"'logit_bias' keys must be token ids (0 or more); got {token}.", "logit_bias"
                )
            _check_range("logit_bias", bias, -100.0, 100.0)


def _check_messages(messages: tuple[ChatMessage, ...], spec: ModelSpec, limits: Limits) -> int:
    """The messages' checks; returns their characters (tool calls included)."""
    if not messages:
        raise InvalidRequest("'messages' must hold at least one message.", "messages")
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"'messages' may hold at most {limits.max_messages} messages.", "messages"
        )
    total = 0
    calls: set[str] = set()  # ids of the tool calls made so far in the conversation
    for i, message in enumerate(messages):
        if message.role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of system, user, assistant, tool.",
                f"messages[{i}].role",
            )
        if (message.tool_calls or message.role == Role.TOOL) and not spec.tool_parser:
            raise InvalidRequest(
                f"messages[{i}]: the model '{spec.id}' does not support tools.", f"messages[{i}]"
            )
        size = len(message.content)
        if message.tool_calls and message.role != Role.ASSISTANT:
            raise InvalidRequest(
                f"messages[{i}]: only assistant messages hold tool calls.",
                f"messages[{i}].tool_calls",
            )
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{i}].tool_calls[{j}]"
            if not call.id:
                raise InvalidRequest(f"'{where}.id' is required.", f"{where}.id")
            if not _TOOL_NAME.fullmatch(call.name):
                raise InvalidRequest(
                    f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-'.",
                    f"{where}.function.name",
                )
            calls.add(call.id)
            size += len(call.name) + len(call.arguments)
        if message.role == Role.TOOL:
            where = f"messages[{i}].tool_call_id"
            if not message.tool_call_id:
                raise InvalidRequest(f"'{where}' is required in a tool message.", where)
            if message.tool_call_id not in calls:
                raise InvalidRequest(
                    f"'{where}' ({message.tool_call_id[:64]!r}) answers no tool call of an"
                    " earlier assistant message.",
                    where,
                )
        elif message.tool_call_id:
            raise InvalidRequest(
                f"messages[{i}]: only tool messages answer a tool call.",
                f"messages[{i}].tool_call_id",
            )
        if size > limits.max_message_chars:
            raise InvalidRequest(
                f"messages[{i}].content may have at most {limits.max_message_chars} characters.",
                f"messages[{i}].content",
            )
        total += size
    if total > limits.max_prompt_chars:
        raise InvalidRequest(
            f"The messages may have at most {limits.max_prompt_chars} characters in all.",
            "messages",
        )
    return total


def _check_tools(request: GenerationRequest, spec: ModelSpec, limits: Limits) -> None:
    choice = request.tool_choice
    forced = choice.mode in _FORCED
    if not request.tools:
        if forced:
            raise InvalidRequest(
                f"'tool_choice' {choice.mode.value!r} needs 'tools' to choose from.", "tool_choice"
            )
        return
    if request.messages is None:
        raise InvalidRequest("'tools' need chat messages, not a raw prompt.", "tools")
    if not spec.tool_parser:
        raise InvalidRequest(
            f"The model '{spec.id}' does not support tools (its catalog entry names no"
            " tool_parser).",
            "tools",
        )
    if len(request.tools) > limits.max_tools:
        raise InvalidRequest(f"'tools' may hold at most {limits.max_tools} tools.", "tools")
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        where = f"tools[{i}].function"
        if not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidRequest(
                f"'{where}.name' must be 1 to 64 letters, digits, '_' or '-'.", f"{where}.name"
            )
        if tool.name in names:
            raise InvalidRequest(
                f"'{where}.name': {tool.name!r} is offered twice.", f"{where}.name"
            )
        names.add(tool.name)
        if len(tool.description) > limits.max_schema_chars:
            raise InvalidRequest(
                f"'{where}.description' may have at most {limits.max_schema_chars} characters.",
                f"{where}.description",
            )
        if tool.parameters:
            parse_schema(
                tool.parameters, f"{where}.parameters", limits.max_schema_chars, object_only=True
            )
    if choice.mode is ToolChoiceMode.FUNCTION and choice.function not in names:
        raise InvalidRequest(
            f"'tool_choice' names the function {choice.function[:64]!r}, which is not in 'tools'.",
            "tool_choice",
        )
    if forced and not spec.structured_outputs:
        raise InvalidRequest(
            f"The model '{spec.id}' cannot be forced to call a tool (it has no constrained"
            " decoding); use tool_choice 'auto'.",
            "tool_choice",
        )
    if forced and request.response_format.type is not ResponseFormatType.TEXT:
        raise InvalidRequest(
            "'response_format' cannot be combined with a forced 'tool_choice': the answer is"
            " the tool call.",
            "response_format",
        )


def _check_response_format(request: GenerationRequest, spec: ModelSpec, limits: Limits) -> None:
    response_format = request.response_format
    if response_format.type is ResponseFormatType.TEXT:
        return
    if response_format.type is ResponseFormatType.JSON_SCHEMA:
        param = "response_format.json_schema.schema"
        if not response_format.schema:
            raise InvalidRequest(f"'{param}' is required.", param)
        parse_schema(response_format.schema, param, limits.max_schema_chars, object_only=False)
    if not spec.structured_outputs:
        raise InvalidRequest(
            f"The model '{spec.id}' does not support response_format"
            f" {response_format.type.value!r} (it has no constrained decoding).",
            "response_format",
        )


def validate(request: GenerationRequest, spec: ModelSpec, limits: Limits) -> None:
    """Raise ``InvalidRequest`` when ``request`` may not be sent to ``spec``'s model."""
    interval = request.stream_interval_ms
    if interval is not None and not 0 <= interval <= spec.max_stream_interval_ms:
        raise InvalidRequest(
            f"'stream_interval_ms' must be between 0 and {spec.max_stream_interval_ms} for"
            f" '{spec.id}'; got {interval}.",
            "stream_interval_ms",
        )
    if len(request.request_id) > limits.max_request_id_chars:
        raise InvalidRequest(
            f"'request_id' may have at most {limits.max_request_id_chars} characters.",
            "request_id",
        )
    if len(request.labels) > limits.max_labels:
        raise InvalidRequest(f"At most {limits.max_labels} labels are allowed.", "labels")
    if not 1 <= request.n <= limits.max_n:
        raise InvalidRequest(f"'n' must be between 1 and {limits.max_n}; got {request.n}.", "n")
    if (request.messages is None) == (request.prompt is None):
        raise InvalidRequest("Give either chat messages or a prompt.", "messages")
    if request.prompt is not None:
        if not request.prompt:
            raise InvalidRequest("'prompt' must not be empty.", "prompt")
        if len(request.prompt) > limits.max_prompt_chars:
            raise InvalidRequest(
                f"'prompt' may have at most {limits.max_prompt_chars} characters.", "prompt"
            )
    if request.messages is not None:
        total = _check_messages(request.messages, spec, limits)
        # The tools go into the prompt too.
        total += sum(len(t.name) + len(t.description) + len(t.parameters) for t in request.tools)
        if total > limits.max_prompt_chars:
            raise InvalidRequest(
                f"The messages and tools may have at most {limits.max_prompt_chars} characters"
                " in all.",
                "tools",
            )
    _check_tools(request, spec, limits)
    _check_response_format(request, spec, limits)
    _check_sampling(request.sampling, spec, limits)


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a plan's answer is read for tool calls: in ``format``; ``forced``: the answer is one
    call, constrained; ``parallel`` false: at most one call."""

    format: ToolFormat
    forced: bool = False
    parallel: bool = True

    def parser(self) -> ToolCallParser:
        """A parser for one answer (each choice needs its own)."""
        return self.format.parser(forced=self.forced, parallel=self.parallel)


@dataclass(frozen=True, slots=True)
class Plan:
    """A request made ready for one catalog model: validated, templated, defaults filled."""

    spec: ModelSpec
    prompt: str
    request: GenerationRequest
    fallback: bool = False
    retrieval: RetrievalReport | None = None
    tools: ToolPlan | None = None  # None: the answer is text
    stream_interval_s: float = field(init=False)
    """How long deltas may wait for company after a chunk (the request's, or the model's
    default): worked out once, as the relay and each attempt read it."""

    def __post_init__(self) -> None:
        asked = self.request.stream_interval_ms
        interval = self.spec.stream_interval_ms if asked is None else asked
        object.__setattr__(self, "stream_interval_s", interval / 1000)

    @property
    def continuable(self) -> bool:
        """Whether another node may continue this plan's answer from its text so far: not under
        a constraint (a response format, a forced call), whose grammar would start over after
        the partial text rather than go on from it."""
        return self.request.sampling.structured is None


class Planner:
    """The catalog's models, their templates and the request limits. Safe for concurrent use."""

    def __init__(self, models: Iterable[ModelSpec], limits: Limits) -> None:
        self._specs = {m.id: m for m in models}
        self._templates = {
            m.id: ChatTemplate(m.chat_template, m.default_system_prompt)
            for m in self._specs.values()
        }
        self._limits = limits

    @property
    def specs(self) -> Iterable[ModelSpec]:
        return self._specs.values()

    def spec(self, model: str) -> ModelSpec:
        """The catalog entry of ``model``; raises ``InvalidRequest`` / ``ModelNotFound``."""
        spec = self._specs.get(model)
        if spec is None:
            if not model:
                raise InvalidRequest("'model' is required.", "model")
            raise ModelNotFound(model)
        return spec

    def precheck(self, request: GenerationRequest) -> None:
        """Check the request's schemas (tool parameters, response format) ahead of ``plans``,
        which then finds their verdicts remembered: the checks cost CPU in proportion to the
        schemas, so the relay runs this on a worker thread. Never raises."""
        limits = self._limits
        texts = [t.parameters for t in request.tools[: limits.max_tools]]
        precheck([*texts, request.response_format.schema], limits.max_schema_chars)

    def plans(self, request: GenerationRequest) -> list[Plan]:
        """The primary plan, then the fallback's (if any, and if the request fits it). Gives the
        request an id when it has none. Raises ``InvalidRequest`` (or a subclass) when the
        request may not be sent to its model."""
        spec = self.spec(request.model)
        request = dataclasses.replace(request, request_id=request.request_id or uuid.uuid4().hex)
        plans = [self._plan(spec, request, False)]
        if spec.fallback:
            try:
                plans.append(self._plan(self._specs[spec.fallback], request, True))
            except InvalidRequest as exc:
                log.info(
                    "request does not fit the fallback model",
                    extra={"fields": {"fallback": spec.fallback, "error": exc.message}},
                )
        return plans

    def with_context(
        self, plans: list[Plan], augmented: GenerationRequest, report: RetrievalReport
    ) -> list[Plan]:
        """``plans`` with the retrieval stage's context in their prompts (``augmented`` is the
        caller's request with the context added to its messages or prompt) and its report.
        A fallback that no longer fits is dropped; the primary must fit (the stage sized the
        context for it) and raises ``InvalidRequest`` otherwise."""
        out = []
        for plan in plans:
            request = dataclasses.replace(
                plan.request, messages=augmented.messages, prompt=augmented.prompt
            )
            try:
                validate(request, plan.spec, self._limits)
            except InvalidRequest:
                if not plan.fallback:
                    raise
                continue
            out.append(
                dataclasses.replace(
                    plan, prompt=self._render(plan.spec, request), request=request, retrieval=report
                )
            )
        return out

    def continuation(self, plan: Plan, text: str, produced: int, number: int) -> Plan:
        """``plan`` continued once ``text`` (``produced`` tokens) went out to the caller: the
        same rendered prompt with ``text`` after it — where the template left the assistant's
        turn open, so the model reads it as its own partial answer — ``max_tokens`` reduced by
        ``produced`` (at least 1 is left: the caller checks there is room), the same stop
        sequences, seed and other parameters, and a request id of its own (``-c<number>``: a
        node may still be tearing the interrupted request down)."""
        sampling = plan.request.sampling
        limit = sampling.max_tokens or plan.spec.default_max_tokens
        request = dataclasses.replace(
            plan.request,
            sampling=dataclasses.replace(sampling, max_tokens=max(limit - produced, 1)),
            request_id=f"{plan.request.request_id}-c{number}",
        )
        return dataclasses.replace(plan, prompt=plan.prompt + text, request=request)

    def _render(self, spec: ModelSpec, request: GenerationRequest) -> str:
        if request.messages is not None:
            offered = request.tools if request.tool_choice.mode != ToolChoiceMode.NONE else ()
            return self._templates[spec.id].render(request.messages, offered)
        return request.prompt or ""

    def _plan(self, spec: ModelSpec, request: GenerationRequest, fallback: bool) -> Plan:
        validate(request, spec, self._limits)
        sampling = request.sampling
        if sampling.max_tokens is None:
            sampling = dataclasses.replace(sampling, max_tokens=spec.default_max_tokens)
        tools, structured = _constraints(spec, request)
        if structured is not None:
            sampling = dataclasses.replace(sampling, structured=structured)
        request = dataclasses.replace(request, sampling=sampling)
        return Plan(spec, self._render(spec, request), request, fallback, tools=tools)


def _constraints(
    spec: ModelSpec, request: GenerationRequest
) -> tuple[ToolPlan | None, StructuredOutput | None]:
    """How the answer is read for tool calls, and the constraint on its text (a validated
    request: the model has a tool format when tools are offered)."""
    structured = None
    response_format = request.response_format
    if response_format.type == ResponseFormatType.JSON_OBJECT:
        structured = StructuredOutput(json_object=True)
    elif response_format.type == ResponseFormatType.JSON_SCHEMA:
        schema = bounded(json.loads(response_format.schema))
        structured = StructuredOutput(schema=json.dumps(schema, separators=(",", ":")))
    choice = request.tool_choice
    if not request.tools or choice.mode == ToolChoiceMode.NONE:
        return None, structured
    tool_format = FORMATS[spec.tool_parser]
    forced = choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)
    if forced:
        chosen = (
            request.tools
            if choice.mode == ToolChoiceMode.REQUIRED
            else tuple(t for t in request.tools if t.name == choice.function)
        )
        schema = bounded(tool_format.call_schema(chosen))
        structured = StructuredOutput(schema=json.dumps(schema, separators=(",", ":")))
    return ToolPlan(tool_format, forced, request.parallel_tool_calls), structured
