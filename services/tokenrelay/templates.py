"""Chat templates: turn a conversation into the prompt text a model was trained on.

Templates are Jinja2, rendered in a sandbox the way Hugging Face tokenizers render their
``chat_template`` (variables ``messages``, ``tools``, ``add_generation_prompt``, plus
``default_system``; the ``tojson`` filter and the ``raise_exception`` and ``strftime_now``
functions as Hugging Face defines them), so a model's template can be copied from its
``tokenizer_config.json`` into the catalog unchanged.

What a template sees, as Hugging Face's templates expect it: each message is a dict with ``role``
and ``content``; an assistant message that called tools also has ``tool_calls`` (a list of
``{"id", "type": "function", "function": {"name", "arguments"}}``, the arguments parsed into a
dict when they are a JSON object), a tool message ``tool_call_id``. ``tools`` is None without
tools, else a list of ``{"type": "function", "function": {"name", "description",
"parameters"}}``.

The builtin templates render tools in the format of their family's tool parser
(``orchestrator/_tools.py``): ``chatml`` as Hermes and Qwen2.5 do (the tools in the system turn
inside ``<tools></tools>``, calls as ``<tool_call>{"name": …, "arguments": …}</tool_call>``, results
as ``<tool_response>`` in a user turn), ``llama3`` as Llama 3.1 does with JSON tool calling (the
tools in the first user turn, a call as ``{"name": …, "parameters": …}``, results in ``ipython``
turns).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import ChatMessage, Tool

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "tool_json"]

# ChatML, as SmolLM2-Instruct's tokenizer_config.json has it, with the default system prompt
# made a variable; with tools, Hermes' tool format (as Qwen2.5's template renders it).
# Generation stops at <|im_end|>, the model's end-of-generation token.
_CHATML = """\
{%- set ns = namespace(system=default_system, first=0) %}
{%- if messages and messages[0]['role'] == 'system' %}
{%- set ns.system = messages[0]['content'] %}
{%- set ns.first = 1 %}
{%- endif %}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if ns.system %}{{- ns.system + '\\n\\n' }}{% endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and' }}
{{- ' arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif ns.system %}
{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages[ns.first:] %}
{%- if message['role'] == 'tool' %}
{%- if loop.first or loop.previtem['role'] != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}
{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{% endif %}
{%- elif message['role'] == 'assistant' and message.tool_calls %}
{{- '<|im_start|>assistant' }}
{%- if message['content'] %}{{- '\\n' + message['content'] }}{% endif %}
{%- for call in message.tool_calls %}
{{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
{{- (call.function.arguments if call.function.arguments is string
     else call.function.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}
"""

# Llama 3 instruct format, for the GPU catalog; with tools, Llama 3.1's JSON tool calling (the
# tools in the first user turn, results in ipython turns).
_LLAMA3 = """\
{{- '<|begin_of_text|>' }}
{%- set ns = namespace(system=default_system, first=0, tools_shown=false) %}
{%- if messages and messages[0]['role'] == 'system' %}
{%- set ns.system = messages[0]['content'] | trim %}
{%- set ns.first = 1 %}
{%- endif %}
{%- if tools %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}
{%- if ns.system %}{{- '\\n' + ns.system }}{% endif %}
{{- '<|eot_id|>' }}
{%- elif ns.system %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages[ns.first:] %}
{%- if message['role'] == 'user' and tools and not ns.tools_shown %}
{%- set ns.tools_shown = true %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- 'Given the following functions, please respond with a JSON for a function call with its' }}
{{- ' proper arguments that best answers the given prompt.\\n\\n' }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name' }}
{{- ' and its value}. Do not use variables.\\n\\n' }}
{%- for tool in tools %}{{- (tool | tojson(indent=4)) + '\\n\\n' }}{% endfor %}
{{- message['content'] | trim + '<|eot_id|>' }}
{%- elif message['role'] == 'assistant' and message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for call in message.tool_calls %}
{%- if not loop.first %}{{- '; ' }}{% endif %}
{{- '{"name": "' + call.function.name + '", "parameters": ' }}
{{- (call.function.arguments if call.function.arguments is string
     else call.function.arguments | tojson) + '}' }}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- elif message['role'] == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n'
    + message['content'] | trim + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
    + message['content'] | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama3": _LLAMA3}


def _raise_exception(message: str) -> NoReturn:
    raise InvalidRequest(message, param="messages")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's filter, not Jinja2's: no HTML escaping of <, > and & (a prompt is not HTML).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
)
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = _strftime_now
_ENV.filters["tojson"] = _tojson


def _json_or_text(text: str) -> Any:
    """Arguments as Hugging Face templates expect them: a dict when the text is a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def tool_json(tool: Tool) -> dict[str, Any]:
    """A tool as OpenAI's API (and Hugging Face's templates) spell it."""
    parameters: Any = (
        json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}
    )
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": str(message.role), "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _json_or_text(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


class ChatTemplate:
    """A compiled chat template. ``render`` is pure and safe to call concurrently."""

    def __init__(self, source: str, default_system: str = "") -> None:
        """``source`` is a builtin name (``chatml``, ``llama3``) or Jinja2 text.

        Raises ``ValueError`` when the Jinja2 text does not compile.
        """
        text = BUILTIN_TEMPLATES.get(source, source)
        try:
            self._template = _ENV.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from exc
        self._default_system = default_system

    def render(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> str:
        """The prompt for ``messages`` (offering ``tools`` when there are any), ending where the
        assistant's answer begins.

        Raises ``InvalidRequest`` when the template refuses the conversation.
        """
        return self._template.render(
            messages=[_message(m) for m in messages],
            tools=[tool_json(t) for t in tools] if tools else None,
            add_generation_prompt=True,
            default_system=self._default_system,
        )
