"""The CPU models straight through Triton's gRPC stream, as Triton's vLLM backend is driven."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from tokenrelay.config import Timeouts
from tokenrelay.generation import Sampling
from tokenrelay.orchestrator._triton import TritonNode
from tokenrelay.stack import Stack

CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


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


async def _raw(stack: Stack, model: str, sampling_json: str) -> list[tuple[object, object]]:
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
        ('{"max_tokens": "lots"}', "must be a number"),
        ('{"temperature": -1}', "out of range"),
        ('{"beam_width": 4}', "unknown sampling parameter 'beam_width'"),
    ],
)
@pytest.mark.parametrize("model", ["smollm2", "synthetic"])
async def test_malformed_sampling_parameters_get_a_clear_error(
    stack: Stack, model: str, sampling_json: str, message: str
) -> None:
    responses = await _raw(stack, model, sampling_json)
    assert len(responses) == 1
    _, error = responses[0]
    assert error is not None and message in str(error)
    # The model still serves, and takes numbers written as strings as vLLM's backend does.
    ok = await _raw(stack, model, '{"max_tokens": "3", "temperature": "0"}')
    assert all(e is None for _, e in ok)
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r, _ in ok if r is not None) == 3


async def test_concurrent_requests_do_not_corrupt_each_other(stack: Stack) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    prompts = [CHATML.format(q) for q in ("Name a colour.", "Name an animal.", "Count to five.")]

    async def run(prompt: str) -> str:
        sampling = Sampling(max_tokens=24, temperature=0.7, seed=7)
        return "".join([d.text async for d in node.generate("smollm2", prompt, sampling, "c")])

    try:
        alone = [await run(p) for p in prompts]
        together = await asyncio.gather(*(run(p) for p in prompts))
    finally:
        await node.close()
    assert list(together) == alone
    assert len(set(alone)) == len(alone)


async def test_stop_sequences_and_max_tokens_are_honoured(stack: Stack) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    try:
        prompt = CHATML.format("Count from 1 to 20, separated by commas.")
        full = [
            d
            async for d in node.generate(
                "smollm2", prompt, Sampling(max_tokens=60, temperature=0), "s"
            )
        ]
        text = "".join(d.text for d in full)
        assert "5" in text, text
        cut = [
            d
            async for d in node.generate(
                "smollm2", prompt, Sampling(max_tokens=60, temperature=0, stop=("5",)), "s"
            )
        ]
        cut_text = "".join(d.text for d in cut)
        assert cut_text == text[: text.index("5")]
        assert cut[-1].finish_reason is not None and cut[-1].finish_reason.value == "stop"
        short = [
            d
            async for d in node.generate(
                "smollm2", prompt, Sampling(max_tokens=4, temperature=0), "s"
            )
        ]
        assert sum(d.output_tokens for d in short) == 4
        assert short[-1].finish_reason is not None and short[-1].finish_reason.value == "length"
        assert json.dumps(Sampling(max_tokens=4).to_engine_json()) == '{"max_tokens": 4}'
    finally:
        await node.close()
