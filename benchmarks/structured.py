"""What grammar-constrained decoding costs on SmolLM2, and whether forced outputs are well-formed.

    .venv/bin/python benchmarks/structured.py [--runs 10] [--forced 50] [--out results/structured]

It starts tritonserver with the ``smollm2`` model (free loopback ports) and streams requests
straight to it, as the orchestrator does, with ``sampling_parameters`` as Triton's vLLM backend
reads them:

- cost: the same prompt ``--runs`` times without and with a JSON schema (``structured_outputs``
  ``{"json": …}``), alternating, greedy, ``max_tokens`` 64; time to first token and time per
  output token after the first, p50 of each;
- well-formedness: ``--forced`` sampled generations (temperature 0.8, seeds 0…n-1) forced to a
  schema; the share whose text parses as JSON and validates against the schema (jsonschema).

Prints the figures and writes ``results.json`` to ``--out``. Figures only: nothing here asserts a
target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from jsonschema import Draft202012Validator
from tritonclient.grpc import InferInput

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.stack import Stack, StackPorts  # noqa: E402

PROMPT = (
    "<|im_start|>user\nDescribe a person as JSON with a name, an age, a city and a list of"
    " hobbies.<|im_end|>\n<|im_start|>assistant\n"
)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


def _inputs(prompt: str, sampling: dict[str, Any]) -> list[InferInput]:
    values: dict[str, tuple[str, Any]] = {
        "text_input": ("BYTES", prompt.encode()),
        "stream": ("BOOL", True),
        "sampling_parameters": ("BYTES", json.dumps(sampling).encode()),
        "exclude_input_in_output": ("BOOL", True),
        "return_num_output_tokens": ("BOOL", True),
    }
    inputs = []
    for name, (kind, value) in values.items():
        tensor = InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.array([value], dtype=object if kind == "BYTES" else bool))
        inputs.append(tensor)
    return inputs


async def _generate(
    client: triton_aio.InferenceServerClient, sampling: dict[str, Any]
) -> dict[str, Any]:
    """One streamed request: its text, output tokens, TTFT and time per later token."""

    async def requests():  # type: ignore[no-untyped-def]
        yield {"model_name": "smollm2", "inputs": _inputs(PROMPT, sampling)}

    text, tokens, first = [], 0, None
    began = time.perf_counter()
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise RuntimeError(str(error))
        piece = result.as_numpy("text_output")[0].decode()
        tokens += int(result.as_numpy("num_output_tokens")[0])
        if first is None and tokens:
            first = time.perf_counter() - began
        text.append(piece)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    total = time.perf_counter() - began
    assert first is not None
    per_token = (total - first) / (tokens - 1) if tokens > 1 else None
    return {"text": "".join(text), "tokens": tokens, "ttft_s": first, "tpot_s": per_token}


def _p50(values: list[float | None]) -> float:
    return statistics.median(v for v in values if v is not None)


async def _run(address: str, runs: int, forced: int) -> dict[str, Any]:
    schema_text = json.dumps({"json": SCHEMA})
    plain = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
    constrained = {"max_tokens": 64, "temperature": 0, "structured_outputs": schema_text}
    results: dict[str, Any] = {"plain": [], "schema": [], "forced": []}
    async with triton_aio.InferenceServerClient(address) as client:
        await _generate(client, plain)  # warm up
        for _ in range(runs):
            results["plain"].append(await _generate(client, plain))
            results["schema"].append(await _generate(client, constrained))
        validator = Draft202012Validator(SCHEMA)
        for seed in range(forced):
            sampling = {
                "max_tokens": 256,
                "temperature": 0.8,
                "seed": seed,
                "structured_outputs": schema_text,
            }
            outcome = await _generate(client, sampling)
            try:
                validator.validate(json.loads(outcome["text"]))
                outcome["valid"] = True
            except (json.JSONDecodeError, ValueError) as exc:
                outcome["valid"], outcome["why"] = False, str(exc)[:200]
            results["forced"].append(outcome)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--forced", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    stack = Stack(REPO / "triton_models", StackPorts.free(), models=("smollm2",))
    stack.start_triton()
    try:
        results = asyncio.run(_run(stack.triton_grpc, args.runs, args.forced))
    finally:
        stack.stop()
    plain, schema = results["plain"], results["schema"]
    ttft = (_p50([r["ttft_s"] for r in plain]), _p50([r["ttft_s"] for r in schema]))
    tpot = (_p50([r["tpot_s"] for r in plain]), _p50([r["tpot_s"] for r in schema]))
    valid = sum(r["valid"] for r in results["forced"])
    print(f"\n{args.runs} runs each, greedy, same prompt (p50):")
    print("| decoding | TTFT (ms) | per output token (ms) | tokens |\n|---|---|---|---|")
    for name, rows, i in (("plain", plain, 0), ("JSON schema", schema, 1)):
        tokens = statistics.median(r["tokens"] for r in rows)
        print(f"| {name} | {1000 * ttft[i]:.1f} | {1000 * tpot[i]:.2f} | {tokens:.0f} |")
    print(
        f"\ngrammar: {1000 * (ttft[1] - ttft[0]):+.1f} ms to the first token,"
        f" {1000 * (tpot[1] - tpot[0]):+.2f} ms per token"
        f" ({100 * (tpot[1] / tpot[0] - 1):+.0f} %)"
    )
    print(
        f"forced generations well-formed and valid: {valid} of {len(results['forced'])}"
        f" ({100 * valid / max(1, len(results['forced'])):.0f} %)"
    )
    for r in results["forced"]:
        if not r["valid"]:
            print("  invalid:", repr(r["text"][:120]), r["why"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
