"""The synthetic model's scripted answers: a tool call when the prompt offers tools, text that
uses the tool's result after it, and minimal instances of JSON schemas (no Triton)."""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import pytest

from tokenrelay.generation import ChatMessage, Role, Tool, ToolCall
from tokenrelay.orchestrator._tools import FORMATS
from tokenrelay.templates import ChatTemplate
from tokenrelay.triton_python._contract import EngineSampling, StructuredOutput
from tokenrelay.triton_python.synthetic import SyntheticEngine, minimal_instance, scripted_answer

WEATHER = Tool(
    "get_weather",
    "",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
        }
    ),
)
TOOLS = [Tool("get_time"), WEATHER]
CHATML = ChatTemplate("chatml", "You are helpful.")


def _steps(prompt: str, **sampling: Any) -> list[Any]:
    engine = SyntheticEngine(token_interval_s=0)
    return list(engine.stream(prompt, EngineSampling(**sampling), lambda: False))


def _answer(prompt: str, **sampling: Any) -> tuple[str, list[str], str | None]:
    steps = _steps(prompt, **sampling)
    return "".join(s.text for s in steps), [s.text for s in steps], steps[-1].finish_reason


def test_offered_tools_and_a_user_turn_make_a_hermes_call_of_the_named_tool() -> None:
    prompt = CHATML.render([ChatMessage(Role.USER, "Use GET_WEATHER for Paris")], TOOLS)
    _, pieces, finish = _answer(prompt)
    assert finish == "stop" and len(pieces) > 3  # streamed in pieces, complete
    parser = FORMATS["hermes"].parser()
    parsed = [parser.feed(p) for p in pieces] + [parser.close()]
    calls = [c for p in parsed for c in p.calls]
    assert calls[0].name == "get_weather" and not "".join(p.text for p in parsed)
    arguments = json.loads("".join(c.arguments for c in calls))
    assert arguments == {"city": "", "days": 1}
    jsonschema.validate(arguments, json.loads(WEATHER.parameters))
    # No tool named in the message: the first one.
    other = CHATML.render([ChatMessage(Role.USER, "What now?")], TOOLS)
    assert json.loads(_answer(other)[0].split("\n")[1])["name"] == "get_time"


def test_after_the_tool_result_the_answer_uses_it() -> None:
    conversation = [
        ChatMessage(Role.USER, "Weather in Paris?"),
        ChatMessage(Role.ASSISTANT, "", (ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage(Role.TOOL, '{"forecast": "sunny"}', tool_call_id="c1"),
    ]
    text, _, finish = _answer(CHATML.render(conversation, TOOLS))
    assert text == 'The tool said: {"forecast": "sunny"}.' and finish == "stop"


def test_without_tools_or_after_an_answer_it_streams_words() -> None:
    for prompt in (
        CHATML.render([ChatMessage(Role.USER, "get_weather please")]),
        "a raw <tools> prompt",
    ):
        assert scripted_answer(prompt) is None
        _, pieces, finish = _answer(prompt, max_tokens=5, seed=1)
        assert len(pieces) == 5 and finish == "length"


def test_max_tokens_cuts_a_call() -> None:
    prompt = CHATML.render([ChatMessage(Role.USER, "x")], [WEATHER])
    _, pieces, finish = _answer(prompt, max_tokens=2)
    assert pieces == ["<tool_call>", '\n{"name":'] and finish == "length"


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object"},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 3}}, "required": ["a"]},
    {"type": "array", "items": {"type": "integer", "minimum": 5}, "minItems": 2},
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    {"type": ["null", "boolean"]},
    {"enum": ["red", "green"]},
    {"const": {"k": [1]}},
    {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
    {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"required": ["b"]}]},
    {
        "$defs": {
            "Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
        },
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/Point"}, "q": {"type": "string"}},
        "required": ["p"],
    },
    {
        "type": "object",
        "properties": {"email": {"type": "string", "format": "email"}},
        "required": ["email"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_minimal_instances_validate(schema: dict[str, Any]) -> None:
    instance = minimal_instance(schema)
    jsonschema.validate(
        instance, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    assert minimal_instance(schema) == instance  # deterministic


def test_a_constraint_is_answered_with_its_minimal_instance_and_wins_over_the_tools() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 2}},
        "required": ["n"],
    }
    prompt = CHATML.render([ChatMessage(Role.USER, "get_weather?")], TOOLS)  # would call a tool
    text, _, finish = _answer(
        prompt, structured_outputs=StructuredOutput("json", json.dumps(schema))
    )
    assert json.loads(text) == {"n": 2} and finish == "stop"
    assert _answer("x", structured_outputs=StructuredOutput("json_object"))[0] == "{}"
    choice = StructuredOutput("choice", choices=("maybe so", "no"))
    assert _answer("x", structured_outputs=choice)[0] == "maybe so"


def test_logprobs_are_those_of_its_uniform_choice() -> None:
    steps = _steps("a prompt", max_tokens=6, seed=3, logprobs=2)
    text = "".join(s.text for s in steps)
    assert text == _answer("a prompt", max_tokens=6, seed=3)[0]  # asking changes nothing
    for step in steps:
        (candidates,) = step.logprobs
        sampled = candidates[0]
        assert sampled.decoded_token == step.text  # the sampled token first
        assert len(candidates) == 2 and len({c.token_id for c in candidates}) == 2
        assert all(c.logprob == pytest.approx(-math.log(23)) and c.rank == 1 for c in candidates)
    scripted = _steps(CHATML.render([ChatMessage(Role.USER, "x")], TOOLS), logprobs=3)
    assert all(s.logprobs[0][0].logprob == 0.0 and len(s.logprobs[0]) == 1 for s in scripted)
    assert "".join(s.logprobs[0][0].decoded_token for s in scripted) == "".join(
        s.text for s in scripted
    )
    assert all(not s.logprobs for s in _steps("a prompt", max_tokens=3))
