"""Chat templates (tokenrelay.templates)."""

from __future__ import annotations

import json

import pytest

from tokenrelay.generation import ChatMessage, Role, Tool, ToolCall
from tokenrelay.templates import ChatTemplate


def test_chatml_adds_default_system_prompt_only_when_missing() -> None:
    template = ChatTemplate("chatml", "Be brief.")
    user = [ChatMessage("user", "Hi")]
    assert template.render(user) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own = template.render([ChatMessage("system", "Be long."), *user])
    assert "Be brief." not in own and own.startswith("<|im_start|>system\nBe long.")


def test_llama3_and_custom_templates() -> None:
    rendered = ChatTemplate("llama3").render([ChatMessage("user", " Hi ")])
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Hi<|eot_id|>" in rendered
    custom = ChatTemplate("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>")
    assert custom.render([ChatMessage("user", "x")]) == "[user]x>"
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
)
TURNS = [
    ChatMessage(Role.USER, "Weather in Paris?"),
    ChatMessage(Role.ASSISTANT, "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage(Role.TOOL, '{"forecast": "sunny"}', tool_call_id="call_1"),
]


def test_llama3_renders_tools_calls_and_results_as_llama_3_1_json_tool_calling() -> None:
    rendered = ChatTemplate("llama3").render(TURNS, (WEATHER,))
    # The ipython environment, the tools in the first user turn, before its question.
    assert rendered.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    )
    user = rendered.index("<|start_header_id|>user<|end_header_id|>")
    tools_at, question = (
        rendered.index('"name": "get_weather"'),
        rendered.index("Weather in Paris?"),
    )
    assert user < tools_at < question
    # The call as {"name", "parameters"}, its result in an ipython turn, then the open answer.
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    result = '<|start_header_id|>ipython<|end_header_id|>\n\n{"forecast": "sunny"}<|eot_id|>'
    assert rendered.index(call) < rendered.index(result)
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_renders_tools_calls_and_results_as_hermes_does() -> None:
    rendered = ChatTemplate("chatml").render(TURNS, (WEATHER,))
    tools = rendered[rendered.index("<tools>\n") + 8 : rendered.index("\n</tools>")]
    assert json.loads(tools)["function"]["name"] == "get_weather"
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    result = "<|im_start|>user\n<tool_response>\n" + '{"forecast": "sunny"}\n</tool_response>'
    assert rendered.index(call) < rendered.index(result)
    assert rendered.endswith("<|im_start|>assistant\n")
    # Without tools offered, nothing of them is rendered.
    assert "<tools>" not in ChatTemplate("chatml").render(TURNS[:1])
