"""Validation of a generation request against the catalog and the limits.

Every check raises ``InvalidRequest`` naming the field (``param``) in OpenAI's terms, so the edge
can pass the message through unchanged. Nothing reaches a model before this passes.
"""

from __future__ import annotations

import math

from tokenrelay.config import Limits, ModelSpec
from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import GenerationRequest, Sampling

__all__ = ["validate"]

_ROLES = frozenset({"system", "user", "assistant"})


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
        messages = request.messages
        if not messages:
            raise InvalidRequest("'messages' must hold at least one message.", "messages")
        if len(messages) > limits.max_messages:
            raise InvalidRequest(
                f"'messages' may hold at most {limits.max_messages} messages.", "messages"
            )
        total = 0
        for i, message in enumerate(messages):
            if message.role not in _ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role must be one of system, user, assistant.",
                    f"messages[{i}].role",
                )
            if len(message.content) > limits.max_message_chars:
                raise InvalidRequest(
                    f"messages[{i}].content may have at most {limits.max_message_chars}"
                    " characters.",
                    f"messages[{i}].content",
                )
            total += len(message.content)
        if total > limits.max_prompt_chars:
            raise InvalidRequest(
                f"The messages may have at most {limits.max_prompt_chars} characters in all.",
                "messages",
            )
    _check_sampling(request.sampling, spec, limits)
