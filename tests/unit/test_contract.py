"""The vLLM-contract parsing and stop-sequence matching of the CPU models (no Triton)."""

from __future__ import annotations

import json
import re

import pytest

from tokenrelay.triton_python._contract import (
    BadRequest,
    StopMatcher,
    StructuredOutput,
    parse_sampling,
)
from tokenrelay.triton_python._engine import as_engine, refuse_unsupported
from tokenrelay.triton_python.synthetic import SyntheticEngine, partial_answer


def test_sampling_accepts_vllm_spellings() -> None:
    parsed = parse_sampling('{"max_tokens": "100", "temperature": "0.5", "stop": "END", "seed": 3}')
    assert (parsed.max_tokens, parsed.temperature, parsed.stop, parsed.seed) == (
        100,
        0.5,
        ("END",),
        3,
    )
    assert parse_sampling("").max_tokens is None
    assert parse_sampling('{"n": 1, "seed": null}').seed is None
    # vLLM's bounds: top_p in (0, 1] and repetition_penalty > 0, however small (schemathesis
    # found the orchestrator letting 2.2e-16 through to a model that refused it).
    assert parse_sampling('{"top_p": 2.220446049250313e-16}').top_p > 0
    assert parse_sampling('{"repetition_penalty": 1e-12}').repetition_penalty > 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("3", "must be a JSON object"),
        ('{"top_p": 0}', "out of range"),
        ('{"top_p": 1.5}', "out of range"),
        ('{"repetition_penalty": 0}', "out of range"),
        ('{"max_tokens": 2.5}', "whole number"),
        ('{"max_tokens": true}', "not a boolean"),
        ('{"temperature": "NaN"}', "finite"),
        ('{"stop": [1]}', "list of strings"),
        ('{"n": 2}', "not supported"),
        ('{"lora_name": "x"}', "unknown sampling parameter"),
    ],
)
def test_sampling_refuses_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_sampling(text)


def test_stop_matcher_cuts_across_pieces_and_holds_back_prefixes() -> None:
    matcher = StopMatcher(("<END>",))
    assert matcher.feed("Hello <E") == ("Hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D> more") == ("", True)
    other = StopMatcher(("<END>",))
    assert other.feed("a <E") == ("a ", False)
    assert other.feed("X") == ("<EX", False)
    assert other.feed("<") == ("", False)
    assert other.flush() == "<"
    assert StopMatcher(()).feed("<END>") == ("<END>", False)


def test_synthetic_engine_counts_and_cancels() -> None:
    engine = SyntheticEngine(default_tokens=5, token_interval_s=0.0)
    steps = list(engine.stream("a b", parse_sampling(""), lambda: False))
    assert [s.finish_reason for s in steps] == [None] * 4 + ["stop"]
    assert sum(s.tokens for s in steps) == 5
    limited = list(
        engine.stream("a", parse_sampling('{"max_tokens": 3, "seed": 1}'), lambda: False)
    )
    assert limited[-1].finish_reason == "length" and len(limited) == 3
    again = list(engine.stream("a", parse_sampling('{"max_tokens": 3, "seed": 1}'), lambda: False))
    assert [s.text for s in again] == [s.text for s in limited]
    calls = iter([False, False, True])
    cancelled = list(engine.stream("a", parse_sampling(""), lambda: next(calls, True)))
    assert all(s.finish_reason is None for s in cancelled) and len(cancelled) < 5


def test_synthetic_engine_continues_a_partial_answer_as_greedy_decoding_would() -> None:
    engine = SyntheticEngine(token_interval_s=0.0)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    never = lambda: False  # noqa: E731
    sampling = parse_sampling('{"max_tokens": 12, "seed": 4}')
    whole = "".join(s.text for s in engine.stream(prompt, sampling, never))
    pieces = whole.split(" ")
    given = " ".join(pieces[:5])
    assert partial_answer(prompt + given) == given and partial_answer(prompt) == ""
    shorter = parse_sampling('{"max_tokens": 7, "seed": 4}')
    rest = list(engine.stream(prompt + given, shorter, never))
    assert given + "".join(s.text for s in rest) == whole
    assert rest[-1].finish_reason == "length" and len(rest) == 7
    # Text that is not its own start: a new answer follows it, after a space.
    other = "".join(s.text for s in engine.stream(prompt + "Hi", parse_sampling("{}"), never))
    assert other.startswith(" ")
    assert partial_answer(prompt + "done<|im_end|>\n") == ""


def test_structured_outputs_are_read_as_the_vllm_backend_reads_them() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    # A JSON string inside sampling_parameters, holding StructuredOutputsParams' fields; the
    # schema itself may be an object or JSON text.
    for inner in (schema, json.dumps(schema)):
        text = json.dumps({"structured_outputs": json.dumps({"json": inner})})
        parsed = parse_sampling(text).structured_outputs
        assert parsed == StructuredOutput("json", value=json.dumps(schema))
    choice = json.dumps({"structured_outputs": json.dumps({"choice": ["yes", "no"]})})
    assert parse_sampling(choice).structured_outputs == StructuredOutput(
        "choice", choices=("yes", "no")
    )
    whole = parse_sampling(
        json.dumps(
            {
                "structured_outputs": json.dumps(
                    {"json_object": True, "disable_additional_properties": True}
                )
            }
        )
    )
    assert whole.structured_outputs == StructuredOutput("json_object")
    assert whole.features() == ("structured_outputs",)
    assert parse_sampling("").features() == ()


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        ({"json": {"type": "object"}}, "must be a string holding a JSON object"),
        ("{", "structured_outputs is not valid JSON"),
        ("[1]", "must be a JSON object"),
        (json.dumps({}), "exactly one of json, json_object, choice"),
        (json.dumps({"json": {}, "choice": ["a"]}), "(it holds json, choice)"),
        (json.dumps({"json_object": False}), "exactly one of"),
        (json.dumps({"choice": []}), "list of non-empty strings"),
        (json.dumps({"choice": ["a", 1]}), "list of non-empty strings"),
        (json.dumps({"json": "{not json"}), "'json' is not valid JSON"),
        (json.dumps({"json": [1]}), "must be a JSON schema"),
        (json.dumps({"regex": "[a-z]+"}), "'regex' is not supported by this model"),
        (json.dumps({"grammar": "root ::= x"}), "EBNF/Lark, llama.cpp's are GBNF"),
        (json.dumps({"json": {}, "disable_any_whitespace": True}), "'disable_any_whitespace'"),
        (json.dumps({"json": {}, "backend": "xgrammar"}), "field 'backend' is not supported"),
    ],
)
def test_structured_outputs_refused_with_a_clear_message(structured: object, message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        parse_sampling(json.dumps({"structured_outputs": structured}))


def test_logprobs_and_logit_bias_are_parsed_and_bounded() -> None:
    parsed = parse_sampling('{"logprobs": "3", "logit_bias": {"42": -100, "7": 2.5}}')
    assert parsed.logprobs == 3
    assert parsed.logit_bias == ((42, -100.0), (7, 2.5))
    assert parsed.features() == ("logprobs", "logit_bias")
    assert parse_sampling('{"logprobs": 0}').logprobs == 0
    assert parse_sampling('{"logprobs": null, "logit_bias": null}').features() == ()
    for text, message in (
        ('{"logprobs": 21}', "between 0 and 20"),
        ('{"logprobs": -1}', "between 0 and 20"),
        ('{"logit_bias": [1]}', "object of token id"),
        ('{"logit_bias": {"x": 1}}', "keys must be token ids, got 'x'"),
        ('{"logit_bias": {"-3": 1}}', "keys must be token ids"),
        ('{"logit_bias": {"5": 101}}', "in [-100, 100]"),
        ('{"logit_bias": {"5": "lots"}}', "must be a number"),
    ):
        with pytest.raises(BadRequest, match=re.escape(message)):
            parse_sampling(text)


def test_an_engine_without_a_feature_refuses_requests_that_need_it() -> None:
    # The synthetic model does structured outputs and logprobs, not logit_bias.
    engine = as_engine(SyntheticEngine(default_tokens=2, token_interval_s=0.0))
    assert engine.features == frozenset({"structured_outputs", "logprobs"})
    with pytest.raises(BadRequest, match="'logit_bias' is not supported by this model"):
        refuse_unsupported(parse_sampling('{"logit_bias": {"1": 5}}'), engine.features)
    for text in (
        '{"logprobs": 1}',
        json.dumps({"structured_outputs": json.dumps({"choice": ["a"]})}),
    ):
        refuse_unsupported(parse_sampling(text), engine.features)
    refuse_unsupported(parse_sampling('{"max_tokens": 3}'), engine.features)
