"""The vLLM contract through Triton, checked on every running GPU server of the suite: what the
orchestrator relies on and what the agents issue (14) adds, straight over Triton's gRPC stream.

    python benchmarks/gpu/capabilities.py --work DIR --out OUT   (after ``suite.py start``)

Per server (NVIDIA's vLLM backend and tokenrelay's own vLLM model): streaming with finish
reason and token counts, a stop sequence, the same seed giving the same text, logprobs
(``return_logprobs`` with ``logprobs`` in the sampling parameters), structured outputs
(``structured_outputs`` as a JSON string: a JSON schema, a choice, a regex), a refused
parameter, a non-streaming request repeating the prompt, and cancellation reaching vLLM (the
engine's generated-token counter stops growing). Writes ``OUT/capabilities.json`` and prints a
PASS/FAIL line per check; exits 0 either way (figures, not a gate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "smollm2_vllm"
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
)
OUTPUTS = (
    "text_output",
    "finish_reason",
    "num_input_tokens",
    "num_output_tokens",
    "logprobs",
    "cumulative_logprob",
)


def _inputs(prompt: str, sampling: dict[str, Any], stream: bool = True, **flags: bool) -> list[Any]:
    from tritonclient.grpc import InferInput

    def text(name: str, value: str) -> Any:
        tensor = InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
        return tensor

    def flag(name: str, value: bool) -> Any:
        tensor = InferInput(name, [1], "BOOL")
        tensor.set_data_from_numpy(np.array([value], dtype=bool))
        return tensor

    out = [
        text("text_input", prompt),
        flag("stream", stream),
        text("sampling_parameters", json.dumps(sampling)),
    ]
    defaults = {
        "exclude_input_in_output": stream,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
    }
    for name, value in {**defaults, **flags}.items():
        out.append(flag(name, value))
    return out


async def generate(
    client: Any,
    prompt: str,
    sampling: dict[str, Any],
    stream: bool = True,
    cancel_after: int = 0,
    **flags: bool,
) -> dict[str, Any]:
    """One request over ModelStreamInfer: the responses' outputs, or the error."""
    from tritonclient.grpc import InferRequestedOutput

    wanted = [
        o
        for o in OUTPUTS
        if o not in ("logprobs", "cumulative_logprob") or flags.get("return_logprobs")
    ]
    request = {
        "model_name": MODEL,
        "inputs": _inputs(prompt, sampling, stream, **flags),
        "outputs": [InferRequestedOutput(o) for o in wanted],
        "request_id": f"cap-{time.monotonic_ns()}",
    }

    async def requests() -> Any:
        yield request

    responses: list[dict[str, Any]] = []
    error = None
    iterator = client.stream_infer(requests())
    try:
        async for result, err in iterator:
            if err is not None:
                error = str(err)
                break
            item: dict[str, Any] = {}
            for name in wanted:
                value = result.as_numpy(name)
                if value is None:
                    continue
                first = value.reshape(-1)[0] if value.size else None
                item[name] = (
                    first.decode()
                    if isinstance(first, bytes)
                    else (None if first is None else first.item())
                )
            responses.append(item)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
            if cancel_after and len(responses) >= cancel_after:
                iterator.cancel()
                break
    finally:
        iterator.cancel()
    text = "".join(r.get("text_output") or "" for r in responses)
    return {
        "text": text,
        "responses": responses,
        "error": error,
        "finish": responses[-1].get("finish_reason") if responses else None,
        "tokens": sum(int(r.get("num_output_tokens") or 0) for r in responses),
    }


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def check_server(name: str, grpc: str, metrics: str) -> list[dict[str, Any]]:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url=grpc)
    checks: list[dict[str, Any]] = []

    def record(check: str, ok: bool, detail: Any) -> None:
        checks.append({"server": name, "check": check, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {name:16} {check:22} {str(detail)[:150]}", flush=True)

    async def attempt(check: str, body: Any) -> None:
        try:
            await body()
        except Exception as exc:
            record(check, False, f"raised {exc!r}")

    q = PROMPT.format

    async def basic() -> None:
        r = await generate(
            client, q(q="What is the capital of France?"), {"max_tokens": 12, "temperature": 0}
        )
        record(
            "stream+counts",
            r["error"] is None
            and r["tokens"] == 12
            and r["finish"] == "length"
            and r["responses"][0].get("num_input_tokens", 0) > 10,
            {
                "text": r["text"],
                "tokens": r["tokens"],
                "finish": r["finish"],
                "responses": len(r["responses"]),
            },
        )

    async def stop() -> None:
        r = await generate(
            client,
            q(q="Count from 1 to 20, separated by commas."),
            {"max_tokens": 60, "temperature": 0, "stop": ["7"]},
        )
        record(
            "stop",
            r["error"] is None and r["finish"] == "stop" and "7" not in r["text"],
            {"text": r["text"], "finish": r["finish"]},
        )

    async def seed() -> None:
        sampling = {"max_tokens": 24, "temperature": 1.0, "seed": 1234}
        a = await generate(client, q(q="Tell me a fun fact."), sampling)
        b = await generate(client, q(q="Tell me a fun fact."), sampling)
        c = await generate(client, q(q="Tell me a fun fact."), {**sampling, "seed": 99})
        record(
            "seed",
            a["text"] == b["text"] and a["error"] is None,
            {"same": a["text"] == b["text"], "other_seed_differs": a["text"] != c["text"]},
        )

    async def logprobs() -> None:
        r = await generate(
            client,
            q(q="Say hello."),
            {"max_tokens": 6, "temperature": 0, "logprobs": 2},
            return_logprobs=True,
        )
        entries = []
        for resp in r["responses"]:
            value = resp.get("logprobs")
            if value and value != "null":
                entries.extend(json.loads(value))
        ok = (
            r["error"] is None
            and len(entries) == r["tokens"] == 6
            and all(1 <= len(e) <= 3 for e in entries)
        )
        record(
            "logprobs",
            ok,
            {
                "tokens": r["tokens"],
                "entries": len(entries),
                "first": entries[:1],
                "error": r["error"],
            },
        )

    async def schema() -> None:
        constraint = {
            "json": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
                "required": ["city", "population"],
            }
        }
        r = await generate(
            client,
            q(q="Give the capital of France and its population as JSON."),
            {"max_tokens": 80, "temperature": 0, "structured_outputs": json.dumps(constraint)},
        )
        try:
            value = json.loads(r["text"])
            ok = isinstance(value.get("city"), str) and isinstance(value.get("population"), int)
        except (ValueError, AttributeError):
            ok = False
        record(
            "structured json", ok and r["error"] is None, {"text": r["text"], "error": r["error"]}
        )

    async def choice() -> None:
        r = await generate(
            client,
            q(q="Is the sky blue? Answer yes or no."),
            {
                "max_tokens": 5,
                "temperature": 0,
                "structured_outputs": json.dumps({"choice": ["yes", "no"]}),
            },
        )
        record(
            "structured choice",
            r["text"] in ("yes", "no"),
            {"text": r["text"], "error": r["error"]},
        )

    async def regex() -> None:
        r = await generate(
            client,
            q(q="Give a date."),
            {
                "max_tokens": 20,
                "temperature": 0,
                "structured_outputs": json.dumps({"regex": r"\d{4}-\d{2}-\d{2}"}),
            },
        )
        record(
            "structured regex",
            re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["text"]) is not None,
            {"text": r["text"], "error": r["error"]},
        )

    async def refused() -> None:
        r = await generate(client, q(q="Hi"), {"max_tokens": 4, "no_such_parameter": 1})
        record("bad parameter", r["error"] is not None, {"error": r["error"]})

    async def unary() -> None:
        prompt = q(q="What is 2+2?")
        r = await generate(
            client,
            prompt,
            {"max_tokens": 8, "temperature": 0},
            stream=False,
            exclude_input_in_output=False,
        )
        record(
            "non-streaming",
            r["error"] is None and len(r["responses"]) == 1 and r["text"].startswith(prompt),
            {"responses": len(r["responses"]), "tail": r["text"][len(prompt) :]},
        )

    async def cancel() -> None:
        before = _metric(metrics, "vllm:generation_tokens_total")
        r = await generate(
            client,
            q(q="Write a very long story."),
            {"max_tokens": 1500, "ignore_eos": True, "temperature": 0},
            cancel_after=5,
        )
        await asyncio.sleep(1.5)  # the model polls cancellation; the metrics flush each second
        mid = _metric(metrics, "vllm:generation_tokens_total")
        await asyncio.sleep(1.5)
        after = _metric(metrics, "vllm:generation_tokens_total")
        record(
            "cancellation",
            mid - before < 1000 and after == mid,
            {"tokens_seen": r["tokens"], "engine_tokens": [before, mid, after]},
        )

    for check, body in (
        ("stream+counts", basic),
        ("stop", stop),
        ("seed", seed),
        ("logprobs", logprobs),
        ("structured json", schema),
        ("structured choice", choice),
        ("structured regex", regex),
        ("bad parameter", refused),
        ("non-streaming", unary),
        ("cancellation", cancel),
    ):
        await attempt(check, body)
    await client.close()
    return checks


def run_all(work: Path, out: Path) -> list[dict[str, Any]]:
    state = json.loads((work / "state.json").read_text())
    results: list[dict[str, Any]] = []
    for name, server in state["servers"].items():
        if server.get("failed"):
            continue
        t0 = time.perf_counter()
        results += asyncio.run(check_server(name, server["grpc"], server["metrics"]))
        print(f"{name}: checks took {time.perf_counter() - t0:.1f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capabilities.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services"))
    run_all(args.work.resolve(), args.out)


if __name__ == "__main__":
    main()
