"""The OpenAI request fields of tool calling and structured outputs → ``tokenrelay.v1``.

``tools`` (type ``function``: name, description, JSON-schema ``parameters``; ``strict`` is
accepted: arguments are constrained to the schema when the call is forced), ``tool_choice``
(``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name"}}``),
``parallel_tool_calls``, an assistant message's ``tool_calls``, a tool message's
``tool_call_id``, ``response_format`` (``text``, ``json_object``, ``json_schema`` with
``json_schema.schema``) and ``logit_bias``. JSON types are checked here, each refusal naming the
field; what the values mean (names, schemas, which tool is chosen, whether the model can) is the
orchestrator's to check, for gRPC and HTTP callers alike.
"""

from __future__ import annotations

import json
from typing import Any

from tokenrelay.errors import InvalidRequest
from tokenrelay.v1 import generation_pb2 as pb

__all__ = [
    "logit_bias",
    "message_tool_calls",
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
    if not isinstance(value, dict) or value.get("type") not in _FORMATS:
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
