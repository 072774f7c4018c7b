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

With ``--edge URL`` (a running stack's OpenAI API) the same goes through the edge, as agents use
it: a tool call left to the model (``tool_choice: auto``: whatever it writes, no unparsed Hermes
``<tool_call>`` text may reach the client), a forced call (``required``, and a named one streamed),
a ``json_schema`` response format, logprobs, ``n`` = 2, and ``/v1/embeddings`` (MiniLM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.error
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
        # Cut at max_tokens, or ended by the model before it (counted with its end token).
        counted = (r["finish"] == "length" and r["tokens"] == 12) or (
            r["finish"] == "stop" and 1 <= r["tokens"] < 12
        )
        record(
            "stream+counts",
            r["error"] is None and counted and r["responses"][0].get("num_input_tokens", 0) > 10,
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


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]


def _post(url: str, body: dict[str, Any], stream: bool = False) -> tuple[int, Any]:
    """(status, JSON body) or, streamed, (status, the SSE payloads decoded, [DONE] left out)."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            if not stream:
                return response.status, json.loads(response.read())
            payloads = [
                line[6:].decode().strip()
                for line in response
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]"
            ]
            return response.status, [json.loads(p) for p in payloads]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _weather_ok(arguments: str) -> bool:
    try:
        value = json.loads(arguments)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"city", "unit"}
        and isinstance(value["city"], str)
        and value["unit"] in ("celsius", "fahrenheit")
    )


def check_edge(edge: str, model: str = "smollm2-135m-instruct") -> list[dict[str, Any]]:
    """The agents' capabilities through a running stack's edge (see the module docstring)."""
    chat = f"{edge}/v1/chat/completions"
    checks: list[dict[str, Any]] = []

    def record(check: str, ok: bool, detail: Any) -> None:
        checks.append({"server": "edge", "check": check, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {'edge':16} {check:22} {str(detail)[:150]}", flush=True)

    def attempt(check: str, body: Any) -> None:
        try:
            body()
        except Exception as exc:
            record(check, False, f"raised {exc!r}")

    def auto() -> None:
        status, answer = _post(
            chat, {"model": model, "messages": ASK, "tools": [WEATHER], "temperature": 0}
        )
        choice = answer["choices"][0]
        message = choice["message"]
        calls = message.get("tool_calls") or []
        parsed = bool(calls) and all(_weather_ok(c["function"]["arguments"]) for c in calls)
        leaked = "<tool_call>" in (message.get("content") or "")
        record(
            "tool auto (hermes)",
            status == 200 and not leaked and (parsed or not calls),
            {
                "finish": choice["finish_reason"],
                "calls": [c["function"] for c in calls],
                "content": (message.get("content") or "")[:120],
            },
        )

    def required() -> None:
        body = {"model": model, "messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
        status, answer = _post(chat, body)
        choice = answer["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        record(
            "tool required",
            status == 200
            and choice["finish_reason"] == "tool_calls"
            and len(calls) == 1
            and calls[0]["function"]["name"] == "get_weather"
            and _weather_ok(calls[0]["function"]["arguments"]),
            {"finish": choice["finish_reason"], "calls": [c["function"] for c in calls]},
        )

    def named_streamed() -> None:
        body = {
            "model": model,
            "messages": ASK,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "stream": True,
        }
        status, chunks = _post(chat, body, stream=True)
        name, arguments, finishes = None, "", []
        for chunk in chunks:
            for choice in chunk["choices"]:
                for piece in choice["delta"].get("tool_calls") or []:
                    name = name or piece["function"].get("name")
                    arguments += piece["function"].get("arguments", "")
                if choice.get("finish_reason"):
                    finishes.append(choice["finish_reason"])
        record(
            "tool named, streamed",
            status == 200
            and name == "get_weather"
            and _weather_ok(arguments)
            and finishes == ["tool_calls"],
            {"name": name, "arguments": arguments, "chunks": len(chunks)},
        )

    def schema() -> None:
        city = {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "country": {"type": "string"},
                "population": {"type": "integer"},
            },
            "required": ["name", "country", "population"],
            "additionalProperties": False,
        }
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "City", "schema": city, "strict": True},
            },
            "max_tokens": 200,
            "temperature": 0,
        }
        status, answer = _post(chat, body)
        text = answer["choices"][0]["message"]["content"] or ""
        try:
            value = json.loads(text)
            ok = (
                set(value) == {"name", "country", "population"}
                and isinstance(value["population"], int)
                and all(isinstance(value[k], str) for k in ("name", "country"))
            )
        except (ValueError, TypeError):
            ok = False
        record("json_schema", status == 200 and ok, {"text": text[:150]})

    def logprobs() -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "logprobs": True,
            "top_logprobs": 3,
            "max_tokens": 8,
            "temperature": 0,
        }
        status, answer = _post(chat, body)
        content = (answer["choices"][0].get("logprobs") or {}).get("content") or []
        tokens = answer.get("usage", {}).get("completion_tokens")
        record(
            "logprobs",
            status == 200
            and len(content) == tokens
            and all(1 <= len(e["top_logprobs"]) <= 3 and e["logprob"] <= 0 for e in content),
            {"tokens": tokens, "entries": len(content), "first": content[:1]},
        )

    def two() -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "n": 2,
            "max_tokens": 16,
            "temperature": 0.9,
            "seed": 3,
        }
        status, answer = _post(chat, body)
        choices = answer.get("choices", [])
        record(
            "n=2",
            status == 200
            and [c["index"] for c in choices] == [0, 1]
            and answer["usage"]["completion_tokens"] >= 2,
            {
                "texts": [c["message"]["content"] for c in choices],
                "usage": answer.get("usage"),
            },
        )

    def embeddings() -> None:
        body = {"model": "all-minilm-l6-v2", "input": ["The sea is salty.", "Paris"]}
        status, answer = _post(f"{edge}/v1/embeddings", body)
        vectors = [d["embedding"] for d in answer.get("data", [])]
        norms = [sum(v * v for v in vector) ** 0.5 for vector in vectors]
        record(
            "embeddings (MiniLM)",
            status == 200
            and len(vectors) == 2
            and all(len(v) == 384 for v in vectors)
            and all(abs(n - 1) < 1e-3 for n in norms),
            {"status": status, "dims": [len(v) for v in vectors], "norms": norms},
        )

    for check, body in (
        ("tool auto (hermes)", auto),
        ("tool required", required),
        ("tool named, streamed", named_streamed),
        ("json_schema", schema),
        ("logprobs", logprobs),
        ("n=2", two),
        ("embeddings (MiniLM)", embeddings),
    ):
        attempt(check, body)
    return checks


def run_all(work: Path, out: Path, edge: str | None = None) -> list[dict[str, Any]]:
    state = json.loads((work / "state.json").read_text())
    results: list[dict[str, Any]] = []
    for name, server in state["servers"].items():
        if server.get("failed"):
            continue
        t0 = time.perf_counter()
        results += asyncio.run(check_server(name, server["grpc"], server["metrics"]))
        print(f"{name}: checks took {time.perf_counter() - t0:.1f} s", flush=True)
    if edge:
        t0 = time.perf_counter()
        results += check_edge(edge.rstrip("/"))
        print(f"edge: checks took {time.perf_counter() - t0:.1f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capabilities.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edge", default=None, help="a running stack's edge, e.g. http://h:8080")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services"))
    run_all(args.work.resolve(), args.out, args.edge)


if __name__ == "__main__":
    main()
