"""OpenAI request bodies → orchestrator requests (the answers' JSON is ``_stream``'s).

Field names and meanings follow ``CreateChatCompletionRequest`` / ``CreateCompletionRequest`` of
the official OpenAI description. The edge checks JSON types here; value ranges and limits are the
orchestrator's to check, so gRPC and HTTP callers meet the same rules and messages.

Unknown-field policy: fields this edge does not know are ignored, as OpenAI-compatible servers do
(clients such as LiteLLM and ADK add their own). Known fields that ask for something tokenrelay
does not do (``echo``, ``best_of`` > 1, ``suffix``) are refused with a 400, and so is what a
model's catalog entry says it cannot do (tools, constrained decoding, logprobs, logit_bias; the
orchestrator's checks) — never ignored.

Extension: ``retrieval`` (an object: ``collection``, ``top_k``, ``min_score``, ``on_failure``)
asks for retrieval-augmented generation; the answer then carries a ``retrieval`` object (status
and citations) in the response, or in the first chunk of a stream. With the OpenAI SDK it goes in
``extra_body`` and comes back in ``model_extra``.

Tool calling and structured outputs: ``tools`` (type ``function``: name, description, JSON-schema
``parameters``; ``strict`` is accepted: arguments are constrained to the schema when the call is
forced), ``tool_choice`` (``none``, ``auto``, ``required`` or ``{"type": "function", "function":
{"name"}}``), ``parallel_tool_calls``, an assistant message's ``tool_calls``, a tool message's
``tool_call_id``, ``response_format`` (``text``, ``json_object``, ``json_schema`` with
``json_schema.schema``) and ``logit_bias``. JSON types are checked here, each refusal naming the
field; what the values mean (names, schemas, which tool is chosen, whether the model can) is the
orchestrator's to check, for gRPC and HTTP callers alike.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from tokenrelay.errors import InvalidRequest
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import retrieval_pb2 as rpb

__all__ = [
    "EmbeddingsRequest",
    "ParsedRequest",
    "embeddings_response",
    "loads",
    "logit_bias",
    "message_tool_calls",
    "parse_body",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
    "response_format",
    "tool_choice",
    "tools",
]

_CHOICES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
_FORMATS = {
    "text": pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}


def _type_error(name: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"'{name}' must be {expected}.", name)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _string(value: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    item = value.get(key)
    if item is None and not required:
        return ""
    if not isinstance(item, str):
        raise _type_error(f"{where}.{key}", "a string")
    return item


def tools(body: dict[str, Any]) -> list[pb.Tool]:
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _type_error("tools", "an array")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _type_error(where, "an object")
        if tool.get("type") != "function":
            raise InvalidRequest(f"'{where}.type' must be 'function'.", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _type_error(f"{where}.function", "an object")
        where = f"{where}.function"
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _type_error(f"{where}.parameters", "a JSON Schema object")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _type_error(f"{where}.strict", "a boolean")
        out.append(
            pb.Tool(
                name=_string(function, "name", where, required=True),
                description=_string(function, "description", where),
                parameters=_json(parameters) if parameters is not None else "",
            )
        )
    return out


def tool_choice(body: dict[str, Any]) -> pb.ToolChoice | None:
    value = body.get("tool_choice")
    if value is None:
        return None
    if isinstance(value, str) and value in _CHOICES:
        return pb.ToolChoice(mode=_CHOICES[value])
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if not isinstance(function, dict):
            raise _type_error("tool_choice.function", "an object")
        name = _string(function, "name", "tool_choice.function", required=True)
        return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function=name)
    raise InvalidRequest(
        "'tool_choice' must be 'none', 'auto', 'required' or"
        ' {"type": "function", "function": {"name": ...}}.',
        "tool_choice",
    )


def message_tool_calls(message: dict[str, Any], i: int) -> list[pb.ToolCall]:
    """An assistant message's ``tool_calls`` (arguments stay the JSON text the model wrote)."""
    raw = message.get("tool_calls")
    if raw is None:
        return []
    where = f"messages[{i}].tool_calls"
    if not isinstance(raw, list):
        raise _type_error(where, "an array")
    out = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise _type_error(at, "an object")
        if call.get("type", "function") != "function":
            raise InvalidRequest(f"'{at}.type' must be 'function'.", f"{at}.type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _type_error(f"{at}.function", "an object")
        arguments = function.get("arguments", "")
        if isinstance(arguments, dict):  # some clients send the object itself
            arguments = _json(arguments)
        elif not isinstance(arguments, str):
            raise _type_error(f"{at}.function.arguments", "a string")
        out.append(
            pb.ToolCall(
                id=_string(call, "id", at),
                name=_string(function, "name", f"{at}.function", required=True),
                arguments=arguments,
            )
        )
    return out


def response_format(body: dict[str, Any]) -> pb.ResponseFormat | None:
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind not in _FORMATS:  # (an object or array: unhashable)
        raise InvalidRequest(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
            "response_format",
        )
    out = pb.ResponseFormat(type=_FORMATS[value["type"]])
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _type_error("response_format.json_schema", "an object")
        schema = spec.get("schema")
        if schema is not None:
            if not isinstance(schema, dict):
                raise _type_error("response_format.json_schema.schema", "a JSON Schema object")
            out.schema = _json(schema)
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _type_error("response_format.json_schema.strict", "a boolean")
    return out


def logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """``{"<token id>": bias}``; the orchestrator checks the bounds (and whether the model
    applies it)."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object of token ids and biases")
    out = {}
    for token, bias in value.items():
        if not (token.isascii() and token.isdigit()) or int(token) > 2**31 - 1:
            raise InvalidRequest(
                f"'logit_bias' keys must be token ids; got {token[:20]!r}.", "logit_bias"
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float) or abs(bias) > 1e6:
            raise _type_error("logit_bias", "an object of token ids and numbers in [-100, 100]")
        out[int(token)] = float(bias)
    return out


_INT32 = 2**31 - 1
_INT64 = 2**63 - 1
_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A generation request as the orchestrator takes it, and how its answer is to be spelt:
    streamed or not, with usage, how many choices (``n``), with logprobs or not."""

    request: pb.GenerateStreamRequest
    stream: bool
    include_usage: bool
    n: int
    logprobs: bool


def _parsed(request: pb.GenerateStreamRequest, stream: bool, include_usage: bool) -> ParsedRequest:
    n = request.n if request.HasField("n") else 1
    return ParsedRequest(
        request, stream, include_usage, n, request.sampling.HasField("top_logprobs")
    )


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"The request body is not valid JSON: {name} is not allowed.")


# A \uD800 to \uDFFF escape: legal JSON, but alone (not as half of a pair) it is no text at all.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def loads(body: bytes) -> dict[str, Any]:
    """Parse a request body; refuses invalid UTF-8, NaN/Infinity, non-object JSON, nesting too
    deep for the parser, and strings holding a lone UTF-16 surrogate (which cannot be encoded,
    so could reach no model). Surrogate pairs (``\\ud83d\\ude00``) are ordinary text."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from None
    except RecursionError:
        raise InvalidRequest(
            "The request body is not valid JSON: it is nested too deeply."
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(
                "The request body holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff)"
                " in a string; only complete surrogate pairs encode text."
            ) from None
    return value


def _model(body: dict[str, Any]) -> str:
    value = body.get("model")
    if value is None:
        raise InvalidRequest("'model' is required.", "model")
    if not isinstance(value, str):
        raise _type_error("model", "a string")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean")
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _type_error(name, "a number")
    return float(value)


def _integer(body: dict[str, Any], name: str, bound: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer")
    if not -bound - 1 <= value <= bound:
        raise InvalidRequest(f"'{name}' is out of range.", name)
    return value


def _sampling(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> pb.SamplingParams:
    sampling = pb.SamplingParams()
    for name in max_tokens_names:
        max_tokens = _integer(body, name, _INT32)
        if max_tokens is not None:
            sampling.max_tokens = max_tokens
            break
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(sampling, name, value)
    top_k = _integer(body, "top_k", _INT32)  # vLLM's extension
    if top_k is not None and top_k != -1:
        sampling.top_k = top_k
    seed = _integer(body, "seed", _INT64)
    if seed is not None:
        sampling.seed = seed
    for token, bias in logit_bias(body).items():
        sampling.logit_bias[token] = bias
    stop = body.get("stop")
    if isinstance(stop, str):
        sampling.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        sampling.stop.extend(stop)
    elif stop is not None:
        raise _type_error("stop", "a string or an array of strings")
    return sampling


_POLICIES = {
    "answer": rpb.RETRIEVAL_FAILURE_POLICY_ANSWER_WITHOUT_CONTEXT,
    "fail": rpb.RETRIEVAL_FAILURE_POLICY_FAIL,
}


def _retrieval(body: dict[str, Any]) -> rpb.RetrievalOptions | None:
    value = body.get("retrieval")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type_error("retrieval", "an object")
    collection = value.get("collection")
    if not isinstance(collection, str):
        raise _type_error("retrieval.collection", "a string")
    options = rpb.RetrievalOptions(collection=collection)
    top_k = _integer(value, "top_k", _INT32)
    if top_k is not None:  # its bounds are the orchestrator's to check, as over gRPC
        if top_k < 0:
            raise _type_error("retrieval.top_k", "a non-negative integer")
        options.top_k = top_k
    min_score = _number(value, "min_score")
    if min_score is not None:
        options.min_score = min_score
    policy = value.get("on_failure")
    if policy is not None:
        if not isinstance(policy, str) or policy not in _POLICIES:
            raise InvalidRequest(
                "'retrieval.on_failure' must be 'answer' or 'fail'.", "retrieval.on_failure"
            )
        options.on_failure = _POLICIES[policy]
    return options


def _stream_interval(body: dict[str, Any], request: pb.GenerateStreamRequest) -> None:
    """The ``stream_interval_ms`` extension: tokens that arrive within that many milliseconds
    of the previous chunk ride in the next one (the model's maximum is the orchestrator's to
    check, as over gRPC)."""
    interval = _integer(body, "stream_interval_ms", _INT32)
    if interval is None:
        return
    if interval < 0:
        raise _type_error("stream_interval_ms", "a non-negative integer")
    request.stream_interval_ms = interval


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str]
    base64: bool
    dimensions: int | None  # when given, it must be the model's


def parse_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    """A ``/v1/embeddings`` body; raises ``InvalidRequest`` naming the field."""
    model = _model(body)
    value = body.get("input")
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = list(value)
    elif isinstance(value, list) and value:
        raise InvalidRequest(
            "'input' must be a string or an array of strings (token arrays are not supported).",
            "input",
        )
    else:
        raise _type_error("input", "a string or a non-empty array of strings")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dimensions = _integer(body, "dimensions", _INT32)
    return EmbeddingsRequest(model, inputs, encoding == "base64", dimensions)


def embeddings_response(model: str, response: rpb.EmbedResponse, as_base64: bool) -> dict[str, Any]:
    data = []
    for i, embedding in enumerate(response.embeddings):
        values: Any = list(embedding.values)
        if as_base64:  # little-endian float32, as OpenAI encodes it
            packed = struct.pack(f"<{len(values)}f", *values)
            values = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": values})
    tokens = response.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("echo") not in (None, False):
        raise InvalidRequest("echo is not supported.", "echo")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("Only best_of=1 is supported.", "best_of")


def _choices_and_logprobs(
    body: dict[str, Any], request: pb.GenerateStreamRequest, chat: bool
) -> None:
    """``n``, and logprobs as each endpoint spells them: chat ``logprobs`` (a boolean) with
    ``top_logprobs``; completions ``logprobs`` (how many alternatives)."""
    n = _integer(body, "n", _INT32)
    if n is not None:
        request.n = n  # its bounds are the orchestrator's
    if chat:
        top = _integer(body, "top_logprobs", _INT32)
        if _bool(body, "logprobs"):
            request.sampling.top_logprobs = top or 0
        elif top is not None:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    else:
        count = _integer(body, "logprobs", _INT32)
        if count is not None:
            request.sampling.top_logprobs = count


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _type_error("stream_options.include_usage", "a boolean")
    return stream, include


def _content(value: Any, i: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    f"messages[{i}].content: only text parts are supported.",
                    f"messages[{i}].content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _type_error(f"messages[{i}].content.text", "a string")
            texts.append(text)
        return "".join(texts)
    raise _type_error(f"messages[{i}].content", "a string or an array of text parts")


def _messages(body: dict[str, Any]) -> list[pb.ChatMessage]:
    raw = body.get("messages")
    if raw is None:
        raise InvalidRequest("'messages' is required.", "messages")
    if not isinstance(raw, list):
        raise _type_error("messages", "an array")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{i}]", "an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of system, developer, user, assistant, tool.",
                f"messages[{i}].role",
            )
        converted = pb.ChatMessage(role=_ROLES[role], content=_content(message.get("content"), i))
        if role == "assistant":
            converted.tool_calls.extend(message_tool_calls(message, i))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise _type_error(f"messages[{i}].tool_call_id", "a string")
            converted.tool_call_id = call_id or ""
        messages.append(converted)
    return messages


def parse_chat(body: dict[str, Any], request_id: str) -> ParsedRequest:
    """A ``/v1/chat/completions`` body; raises ``InvalidRequest`` naming the field."""
    model = _model(body)
    messages = _messages(body)
    _refuse_unsupported(body)
    stream, include_usage = _stream_flags(body)
    request = pb.GenerateStreamRequest(
        model=model,
        chat=pb.Chat(messages=messages),
        sampling=_sampling(body, ("max_completion_tokens", "max_tokens")),
        request_id=request_id,
        retrieval=_retrieval(body),
        tools=tools(body),
        tool_choice=tool_choice(body),
        response_format=response_format(body),
    )
    _stream_interval(body, request)
    if body.get("parallel_tool_calls") is not None:
        request.parallel_tool_calls = _bool(body, "parallel_tool_calls")
    _choices_and_logprobs(body, request, chat=True)
    return _parsed(request, stream, include_usage)


def parse_completion(body: dict[str, Any], request_id: str) -> ParsedRequest:
    """A ``/v1/completions`` body; raises ``InvalidRequest`` naming the field."""
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _type_error("prompt", "a string")
    _refuse_unsupported(body)
    if body.get("suffix") is not None:
        raise InvalidRequest("suffix is not supported.", "suffix")
    stream, include_usage = _stream_flags(body)
    request = pb.GenerateStreamRequest(
        model=model,
        prompt=prompt,
        sampling=_sampling(body, ("max_tokens",)),
        request_id=request_id,
        retrieval=_retrieval(body),
    )
    _stream_interval(body, request)
    _choices_and_logprobs(body, request, chat=False)
    return _parsed(request, stream, include_usage)


def parse_body(raw: bytes, request_id: str, chat: bool) -> ParsedRequest:
    """A ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` request body, as it came:
    ``loads``, then ``parse_chat`` or ``parse_completion``."""
    body = loads(raw)
    return parse_chat(body, request_id) if chat else parse_completion(body, request_id)
