"""The tool-call parser (orchestrator/_tools.py): the same calls and text however the model's
output is split into deltas, text before a call out at once, arguments as they come, bounded
holding, and malformed calls back as text."""

from __future__ import annotations

import itertools
import json
import random

import jsonschema
import pytest

from tokenrelay.generation import Tool
from tokenrelay.orchestrator._tools import FORMATS, Parsed, ToolCallParser

ARGS = '{"city": "Pa\\"ris }{", "days": [1, {"n": 2}], "unit": null, "ok": true, "t": -1.5e3}'
HERMES = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": ' + ARGS + "}\n</tool_call>\n"
    '<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>'
)
LLAMA = (
    '<|python_tag|>{"name": "get_weather", "parameters": '
    + ARGS
    + '}; {"name": "f", "parameters": {}}'
)


def _parser(fmt: str, **options: object) -> ToolCallParser:
    counter = itertools.count()
    return FORMATS[fmt].parser(new_id=lambda: f"call_{next(counter)}", **options)  # type: ignore[arg-type]


def _run(
    parser: ToolCallParser, pieces: list[str]
) -> tuple[str, dict[int, dict[str, str]], list[Parsed]]:
    outputs = [parser.feed(piece) for piece in pieces] + [parser.close()]
    calls: dict[int, dict[str, str]] = {}
    for output in outputs:
        for piece in output.calls:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            assert not (call["id"] and piece.id), "a call's id and name come once, first"
            call["id"] += piece.id
            call["name"] += piece.name
            call["arguments"] += piece.arguments
    return "".join(o.text for o in outputs), calls, outputs


def _splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13])
        pieces.append(text[i : i + size])
        i += size
    return pieces


def _all_splits(text: str) -> list[list[str]]:
    """Every split in two, one character at a time, and random splits."""
    return [
        *([text[:i], text[i:]] for i in range(len(text) + 1)),
        list(text),
        *(_splits(text, seed) for seed in range(20)),
    ]


def test_hermes_calls_and_text_are_the_same_however_the_output_is_split() -> None:
    whole_text, whole_calls, _ = _run(_parser("hermes"), [HERMES])
    assert whole_text == "Let me check.\n"
    assert [c["name"] for c in whole_calls.values()] == ["get_weather", "get_time"]
    assert json.loads(whole_calls[0]["arguments"]) == json.loads(ARGS)
    assert whole_calls[0]["arguments"] == ARGS  # as the model wrote it
    assert whole_calls[1]["arguments"] == "{}"
    assert [c["id"] for c in whole_calls.values()] == ["call_0", "call_1"]
    for pieces in _all_splits(HERMES):
        assert _run(_parser("hermes"), pieces)[:2] == (whole_text, whole_calls), pieces


def test_text_before_a_call_goes_out_at_once_and_only_a_possible_tag_is_held() -> None:
    parser = _parser("hermes")
    assert parser.feed("Sure, a < b. ").text == "Sure, a < b. "
    assert parser.feed("Now <tool").text == "Now "  # "<tool" may open a call
    assert parser.feed("kit> is a word").text == "<toolkit> is a word"
    assert parser.feed(" <").text == " "
    assert parser.close() == Parsed("<")  # nothing followed: it was text


def test_the_name_goes_out_first_and_the_arguments_as_they_come() -> None:
    parser = _parser("hermes")
    named = parser.feed('<tool_call>{"name": "get_weather", ')
    assert [(c.index, c.id, c.name, c.arguments) for c in named.calls] == [
        (0, "call_0", "get_weather", "")
    ]
    assert parser.feed('"arguments": {"city": ').calls[0].arguments == '{"city": '
    assert parser.feed('"Par').calls[0].arguments == '"Par'
    last = parser.feed('is"}}</tool_call>')
    assert [(c.id, c.name, c.arguments) for c in last.calls] == [("", "", 'is"}')]
    character_by_character = _run(_parser("hermes"), list(HERMES))[2]
    argument_pieces = [c for o in character_by_character for c in o.calls if c.index == 0]
    assert len(argument_pieces) > 10  # streamed, not buffered to the end


def test_arguments_before_the_name_are_held_until_the_name_is_known() -> None:
    text, calls, outputs = _run(
        _parser("hermes"), ['<tool_call>{"arguments": {"x": 1},', ' "name": "f"}</tool_call>']
    )
    assert not outputs[0].calls and text == ""
    assert calls == {0: {"id": "call_0", "name": "f", "arguments": '{"x": 1}'}}


@pytest.mark.parametrize(
    "output",
    [
        "<tool_call>not json at all</tool_call> and more",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": 42, "arguments": {}}</tool_call>',
        '<tool_call>{"arguments": [1], "name": "f"}</tool_call>',
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        "<tool_call>{}</tool_call>",
    ],
)
def test_a_malformed_call_is_text(output: str) -> None:
    for pieces in _all_splits(output):
        text, calls, _ = _run(_parser("hermes"), pieces)
        assert (text, calls) == (output, {}), pieces


def test_a_call_whose_name_does_not_come_within_the_bound_is_text_before_the_end() -> None:
    parser = _parser("hermes", max_held=100)
    filler = '{"arguments": {"x": "' + "y" * 300 + '"}, "name": "f"}'
    out = parser.feed("<tool_call>" + filler[:150])
    assert out.text.startswith("<tool_call>{") and not out.calls  # released at the bound
    text, calls, _ = _run(parser, [filler[150:]])
    assert out.text + text == "<tool_call>" + filler and not calls


def test_calls_without_closing_tags_and_text_after_them() -> None:
    output = (
        '<tool_call>{"name": "a", "arguments": {}}\n<tool_call>{"name": "b", "arguments": {}}'
        "</tool_call>\n\nDone."
    )
    for pieces in _all_splits(output):
        text, calls, _ = _run(_parser("hermes"), pieces)
        assert [c["name"] for c in calls.values()] == ["a", "b"]
        assert text == "\n\nDone."  # whitespace between calls is dropped, text after them is not


def test_string_and_null_arguments_become_an_object() -> None:
    output = (
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "g", "arguments": null}</tool_call>'
    )
    for pieces in _all_splits(output):
        _, calls, _ = _run(_parser("hermes"), pieces)
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            ("f", '{"x": 1}'),
            ("g", "{}"),
        ]


def test_a_call_cut_short_or_broken_keeps_what_went_out() -> None:
    text, calls, _ = _run(_parser("hermes"), ['<tool_call>{"name": "f", "arguments": {"x": "ab'])
    assert text == "" and calls == {0: {"id": "call_0", "name": "f", "arguments": '{"x": "ab'}}
    # Broken after its name went out: the call ends there, the rest of it is dropped.
    output = '<tool_call>{"name": "f", "arguments": {"x": 1} oops}</tool_call> after'
    for pieces in _all_splits(output):
        text, calls, _ = _run(_parser("hermes"), pieces)
        assert text == " after" and calls == {
            0: {"id": "call_0", "name": "f", "arguments": '{"x": 1}'}
        }


def test_without_parallel_calls_the_answer_is_done_after_the_first() -> None:
    parser = _parser("hermes", parallel=False)
    text, calls, _ = _run(parser, [HERMES])
    assert parser.done and text == "Let me check.\n" and list(calls) == [0]
    parser = _parser("hermes", parallel=False)
    parser.feed('<tool_call>{"name": "a", "arguments": {"q": 1}}')
    assert parser.done and parser.feed("more") == Parsed()


def test_llama3_json_calls_however_the_output_is_split() -> None:
    whole = _run(_parser("llama3_json"), [LLAMA])[:2]
    assert whole[0] == ""
    assert [(c["name"], c["arguments"]) for c in whole[1].values()] == [
        ("get_weather", ARGS),
        ("f", "{}"),
    ]
    for pieces in _all_splits(LLAMA):
        assert _run(_parser("llama3_json"), pieces)[:2] == whole, pieces
    for pieces in _all_splits(LLAMA[len("<|python_tag|>") :]):
        assert _run(_parser("llama3_json"), pieces)[:2] == whole, pieces


@pytest.mark.parametrize(
    "output", ["The capital is Paris.", "  {curly} braces", "<|python", '{"name": 3}']
)
def test_llama3_json_text_is_text(output: str) -> None:
    for pieces in _all_splits(output):
        assert _run(_parser("llama3_json"), pieces)[:2] == (output, {}), pieces


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_a_forced_call_is_the_bare_object_and_ends_the_answer(fmt: str) -> None:
    key = FORMATS[fmt].arguments_key
    output = ' {"name": "get_weather", "' + key + '": ' + ARGS + "}\n"
    for pieces in _all_splits(output):
        parser = _parser(fmt, forced=True)
        text, calls, _ = _run(parser, pieces)
        assert parser.done and text == ""
        assert calls == {0: {"id": "call_0", "name": "get_weather", "arguments": ARGS}}


def test_the_forced_schema_admits_exactly_a_call_of_an_offered_tool() -> None:
    weather = Tool(
        "get_weather",
        "",
        '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
    )
    schema = FORMATS["hermes"].call_schema((weather, Tool("now")))
    jsonschema.Draft202012Validator.check_schema(schema)
    valid = jsonschema.Draft202012Validator(schema).is_valid
    assert valid({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert valid({"name": "now", "arguments": {}})
    assert not valid({"name": "get_weather", "arguments": {}})
    assert not valid({"name": "other", "arguments": {}})
    assert not valid({"name": "now", "arguments": {}, "extra": 1})
    llama = FORMATS["llama3_json"].call_schema((weather,))
    assert jsonschema.Draft202012Validator(llama).is_valid(
        {"name": "get_weather", "parameters": {"city": "Paris"}}
    )
