"""The CPU models straight through Triton's gRPC stream, as Triton's vLLM backend is driven.

The tests marked ``any_backend`` hold for Triton's vLLM model too (``_support.target``: run them
against a GPU stack with ``TOKENRELAY_TEST_STACK``); the others check the CPU models' own refusals
and the synthetic model."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from jsonschema import Draft202012Validator
from tritonclient.grpc import InferInput

from _support import triton_metric
from _support.target import MODELS, StackUnderTest
from tokenrelay.config import Timeouts
from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import Sampling
from tokenrelay.orchestrator._triton import TritonNode
from tokenrelay.stack import Stack

CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TOKENS = "tokenrelay_model_generated_tokens_total"
SMOL = MODELS.triton  # Triton's name for SmolLM2: smollm2 on the CPU stack
ANY = pytest.mark.any_backend


def _inputs(prompt: str, sampling_json: str) -> list[InferInput]:
    values = {
        "text_input": ("BYTES", prompt.encode()),
        "stream": ("BOOL", True),
        "sampling_parameters": ("BYTES", sampling_json.encode()),
        "exclude_input_in_output": ("BOOL", True),
        "return_num_output_tokens": ("BOOL", True),
    }
    inputs = []
    for name, (kind, value) in values.items():
        tensor = InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.array([value], dtype=object if kind == "BYTES" else bool))
        inputs.append(tensor)
    return inputs


async def _raw(
    stack: StackUnderTest, model: str, sampling_json: str
) -> list[tuple[object, object]]:
    async with triton_aio.InferenceServerClient(stack.triton_grpc) as client:

        async def requests():  # type: ignore[no-untyped-def]
            yield {"model_name": model, "inputs": _inputs("hello there", sampling_json)}

        out = []
        async for result, error in client.stream_infer(requests()):
            out.append((result, error))
            final = (
                error is not None
                or result.get_response().parameters["triton_final_response"].bool_param
            )
            if final:
                return out
    return out


@pytest.mark.parametrize(
    ("sampling_json", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["max_tokens", 3]', "must be a JSON object"),
        # Each backend words these its own way; both name the parameter.
        ('{"max_tokens": "lots"}', "sampling parameter 'max_tokens'"),
        ('{"temperature": -1}', "temperature"),
        ('{"beam_width": 4}', "unknown sampling parameter 'beam_width'"),
    ],
)
@pytest.mark.parametrize("model", [pytest.param(SMOL, marks=ANY), "synthetic"])
async def test_malformed_sampling_parameters_get_a_clear_error(
    stack: StackUnderTest, model: str, sampling_json: str, message: str
) -> None:
    responses = await _raw(stack, model, sampling_json)
    assert len(responses) == 1
    _, error = responses[0]
    assert error is not None and message in str(error)
    # The model still serves, and takes numbers written as strings as vLLM's backend does.
    ok = await _raw(stack, model, '{"max_tokens": "3", "temperature": "0"}')
    assert all(e is None for _, e in ok)
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r, _ in ok if r is not None) == 3


@ANY
async def test_concurrent_requests_do_not_corrupt_each_other(stack: StackUnderTest) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    prompts = [CHATML.format(q) for q in ("Name a colour.", "Name an animal.", "Count to five.")]

    async def run(prompt: str) -> str:
        sampling = Sampling(max_tokens=24, temperature=0.7, seed=7)
        return "".join([d.text async for d in node.generate(SMOL, prompt, sampling, "c")])

    try:
        alone = [await run(p) for p in prompts]
        together = await asyncio.gather(*(run(p) for p in prompts))
    finally:
        await node.close()
    assert list(together) == alone
    assert len(set(alone)) == len(alone)


@ANY
async def test_a_stream_interval_passed_to_the_model_merges_its_responses(
    stack: StackUnderTest,
) -> None:
    # The orchestrator sends its stream interval as the request parameter stream_interval_ms:
    # the model sends the first text at once, then what came within each interval together.
    node = TritonNode(stack.triton_grpc, Timeouts())
    prompt = CHATML.format("Count from 1 to 20, separated by commas.")
    try:
        plain = [
            d
            async for d in node.generate(SMOL, prompt, Sampling(max_tokens=16, temperature=0), "p")
        ]
        sampling = Sampling(max_tokens=16, temperature=0, stream_interval_ms=400)
        merged = [d async for d in node.generate(SMOL, prompt, sampling, "m")]
    finally:
        await node.close()
    assert "".join(d.text for d in merged) == "".join(d.text for d in plain)
    assert sum(d.output_tokens for d in merged) == sum(d.output_tokens for d in plain) == 16
    assert merged[0].text and len(merged) <= len(plain) // 2, (len(merged), len(plain))
    assert merged[-1].finish_reason is not None and merged[-1].finish_reason.value == "length"


@ANY
async def test_a_bad_stream_interval_parameter_is_refused(stack: StackUnderTest) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    try:
        sampling = Sampling(max_tokens=4, stream_interval_ms=10_001)
        with pytest.raises(InvalidRequest):  # the model's words stay in the log
            [d async for d in node.generate(SMOL, CHATML.format("hi"), sampling, "b")]
    finally:
        await node.close()


@ANY
async def test_stop_sequences_and_max_tokens_are_honoured(stack: StackUnderTest) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    try:
        prompt = CHATML.format("Count from 1 to 20, separated by commas.")
        full = [
            d
            async for d in node.generate(SMOL, prompt, Sampling(max_tokens=60, temperature=0), "s")
        ]
        text = "".join(d.text for d in full)
        assert "5" in text, text
        cut = [
            d
            async for d in node.generate(
                SMOL, prompt, Sampling(max_tokens=60, temperature=0, stop=("5",)), "s"
            )
        ]
        cut_text = "".join(d.text for d in cut)
        assert cut_text == text[: text.index("5")]
        assert cut[-1].finish_reason is not None and cut[-1].finish_reason.value == "stop"
        short = [
            d async for d in node.generate(SMOL, prompt, Sampling(max_tokens=4, temperature=0), "s")
        ]
        assert sum(d.output_tokens for d in short) == 4
        assert short[-1].finish_reason is not None and short[-1].finish_reason.value == "length"
        assert json.dumps(Sampling(max_tokens=4).to_engine_json()) == '{"max_tokens": 4}'
    finally:
        await node.close()


# The structured-output, logprobs and logit_bias parts of the vLLM backend's contract.

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "likes"],
    "additionalProperties": False,
}


async def _stream(
    stack: StackUnderTest, model: str, prompt: str, sampling: dict[str, object], **flags: bool
) -> tuple[list[object], object]:
    """Stream one request; (its responses, the error that ended it or None)."""
    inputs = _inputs(prompt, json.dumps(sampling))
    for name, value in flags.items():
        tensor = InferInput(name, [1], "BOOL")
        tensor.set_data_from_numpy(np.array([value], dtype=bool))
        inputs.append(tensor)
    async with triton_aio.InferenceServerClient(stack.triton_grpc) as client:

        async def requests():  # type: ignore[no-untyped-def]
            yield {"model_name": model, "inputs": inputs}

        responses = []
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                return responses, error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    return responses, None


def _text(responses: list[object]) -> str:
    return "".join(r.as_numpy("text_output")[0].decode() for r in responses)  # type: ignore[attr-defined]


def _structured(**constraint: object) -> str:
    return json.dumps(constraint)


@ANY
async def test_a_json_schema_forces_output_that_validates(stack: StackUnderTest) -> None:
    validator = Draft202012Validator(PERSON)
    prompt = CHATML.format("Tell me about a person, as JSON.")
    for sampling in (
        {"temperature": 0},
        {"temperature": 0.9, "seed": 1},
        {"temperature": 0.9, "seed": 2},
    ):
        responses, error = await _stream(
            stack,
            SMOL,
            prompt,
            {"max_tokens": 200, "structured_outputs": _structured(json=PERSON), **sampling},
        )
        assert error is None
        validator.validate(json.loads(_text(responses)))
    # json_object: any JSON object.
    responses, error = await _stream(
        stack,
        SMOL,
        CHATML.format("Give me a JSON object."),
        {"max_tokens": 120, "temperature": 0, "structured_outputs": _structured(json_object=True)},
    )
    assert error is None and isinstance(json.loads(_text(responses)), dict)


@ANY
async def test_a_choice_forces_one_of_the_alternatives(stack: StackUnderTest) -> None:
    choices = ["yes", "no", "it depends"]
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 4}):
        responses, error = await _stream(
            stack,
            SMOL,
            CHATML.format("Is the sea salty?"),
            {"max_tokens": 10, "structured_outputs": _structured(choice=choices), **sampling},
        )
        assert error is None and _text(responses) in choices


@pytest.mark.parametrize(
    ("model", "structured", "message"),
    [
        ("smollm2", {"json": {"$ref": "#/$defs/missing"}}, "this schema is not supported"),
        ("smollm2", {"regex": "[a-z]+"}, "'regex' is not supported by this model"),
        ("smollm2", {"json": {}, "choice": ["a"]}, "exactly one of"),
        ("synthetic", {"grammar": 'root ::= "a"'}, "'grammar' is not supported by this model"),
    ],
)
async def test_a_constraint_that_cannot_be_used_is_refused_before_decoding(
    stack: Stack, model: str, structured: dict[str, object], message: str
) -> None:
    tokens = triton_metric(stack.triton_metrics_url, TOKENS, model=model)
    responses, error = await _stream(
        stack,
        model,
        "hello there",
        {"max_tokens": 8, "structured_outputs": json.dumps(structured)},
    )
    assert not responses and error is not None
    assert message in str(error)
    assert triton_metric(stack.triton_metrics_url, TOKENS, model=model) == tokens


@ANY
async def test_logprobs_come_as_the_vllm_backend_sends_them(stack: StackUnderTest) -> None:
    responses, error = await _stream(
        stack,
        SMOL,
        CHATML.format("What is the capital of France?"),
        {"max_tokens": 12, "temperature": 0, "logprobs": 3},
        return_logprobs=True,
        return_cumulative_logprob=True,
        return_finish_reason=True,
    )
    assert error is None
    entries = [e for r in responses for e in json.loads(r.as_numpy("logprobs")[0])]  # type: ignore[attr-defined]
    assert len(entries) == sum(int(r.as_numpy("num_output_tokens")[0]) for r in responses)  # type: ignore[attr-defined]
    sampled = []
    for entry in entries:
        items = list(entry.items())
        token, first = items[0]
        assert token.isdigit() and first["logprob"] <= 0
        assert first["rank"] == 1  # greedy: the sampled token is the most likely one
        assert set(first) == {"logprob", "rank", "decoded_token"}
        others = [v for _, v in items[1:]]
        assert len(items) == 3  # the sampled token is one of the top 3 here
        ranks = [v["rank"] for v in others]
        assert ranks == sorted(ranks) and all(r > 1 for r in ranks)
        assert [v["logprob"] for v in others] == sorted(
            (v["logprob"] for v in others), reverse=True
        )
        assert all(v["logprob"] <= first["logprob"] for v in others)
        sampled.append(first)
    decoded = [s["decoded_token"] for s in sampled]
    if responses[-1].as_numpy("finish_reason")[0] == b"stop":  # type: ignore[attr-defined]
        # The end-of-generation token counts as output (as in vLLM) and is not in the text.
        assert decoded.pop() == "<|im_end|>"
    assert "".join(decoded) == _text(responses)
    cumulative = float(responses[-1].as_numpy("cumulative_logprob")[0])  # type: ignore[attr-defined]
    assert cumulative == pytest.approx(sum(s["logprob"] for s in sampled), rel=1e-4)
    # Asked for the outputs, not for logprobs: vLLM's "null" and NaN.
    responses, error = await _stream(
        stack,
        SMOL,
        "hello there",
        {"max_tokens": 2},
        return_logprobs=True,
        return_cumulative_logprob=True,
    )
    assert error is None
    assert responses[-1].as_numpy("logprobs")[0] == b"null"  # type: ignore[attr-defined]
    assert math.isnan(float(responses[-1].as_numpy("cumulative_logprob")[0]))  # type: ignore[attr-defined]


@ANY
async def test_logit_bias_that_bans_the_greedy_first_token_changes_it(
    stack: StackUnderTest,
) -> None:
    prompt = CHATML.format("What is the capital of France?")
    greedy = {"max_tokens": 4, "temperature": 0, "logprobs": 0}
    responses, _ = await _stream(stack, SMOL, prompt, greedy, return_logprobs=True)
    first = next(iter(json.loads(responses[0].as_numpy("logprobs")[0])[0]))  # type: ignore[attr-defined]
    banned, _ = await _stream(
        stack,
        SMOL,
        prompt,
        {**greedy, "logit_bias": {first: -100}},
        return_logprobs=True,
    )
    assert next(iter(json.loads(banned[0].as_numpy("logprobs")[0])[0])) != first  # type: ignore[attr-defined]
    assert _text(banned) != _text(responses)
    # A token the vocabulary does not have is refused, by its id.
    responses, error = await _stream(
        stack, SMOL, prompt, {"max_tokens": 4, "logit_bias": {"999999": 5}}
    )
    assert not responses and error is not None and "999999" in str(error)
