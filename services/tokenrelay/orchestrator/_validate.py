"""Validation of a generation request against the catalog and the limits.

Every check raises ``InvalidRequest`` naming the field (``param``) in OpenAI's terms, so the edge
can pass the message through unchanged. Nothing reaches a model before this passes: what a model
cannot do (tools without a tool format, constrained decoding, logprobs, logit_bias — its catalog
entry says) is refused here, never ignored.
"""

from __future__ import annotations

import math
import re

from tokenrelay.config import Limits, ModelSpec
from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import (
    ChatMessage,
    GenerationRequest,
    ResponseFormatType,
    Role,
    Sampling,
    ToolChoiceMode,
)
from tokenrelay.orchestrator._schemas import parse_schema

__all__ = ["validate"]

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
