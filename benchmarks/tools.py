"""Forced tool calls and constrained decoding on SmolLM2: how many calls are well-formed, and what
the constraint costs.

    .venv/bin/python benchmarks/tools.py [--calls 50] [--base-url URL] [--out FILE]

Without ``--base-url`` it starts a stack of its own (Triton with SmolLM2, orchestrator, edge; the
repository's tokenrelay.toml). Then, through the edge:

1. ``--calls`` forced tool calls (``tool_choice`` required, three tools, sampled at temperature
   0.8 with a different seed each time and questions that name different tools, the model's
   default max_tokens), streamed; a call is well-formed when it names one of the tools and its
   arguments parse as JSON and validate against that tool's schema. The share must be 100 %.
   Each call's result goes to stderr as it comes.
2. The same question answered with and without a JSON-schema ``response_format`` (alternating,
   ``--pairs`` times each, greedy, 48 tokens): time to first token and time per output token
   (the rest of the stream over the tokens after the first), medians.

Prints a Markdown table; ``--out`` writes the raw figures as JSON. The machine is shared, so the
figures move by ±15 % between runs: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.stack import Stack, StackPorts  # noqa: E402

MODEL = "smollm2-135m-instruct"
TOOLS = [
    {
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
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount between currencies",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                },
                "required": ["amount", "source", "target"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add_event",
            "description": "Add an event to the calendar",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "day": {"type": "integer", "minimum": 1, "maximum": 31},
                    "attendees": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["title", "day"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]
QUESTIONS = [
    "What is the weather in Paris?",
    "How much is 20 euros in dollars?",
    "Put lunch with Ana on the 3rd in my calendar.",
    "Is it raining in Tokyo right now?",
    "Convert 150 pounds to yen.",
]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer"},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}


def _stream(
    client: httpx.Client, base: str, body: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[float]]:
    """The chunks of a streamed chat answer and when each arrived (seconds since the request)."""
    began = time.perf_counter()
    chunks, times = [], []
    with client.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                times.append(time.perf_counter() - began)
    return chunks, times


def _call(chunks: list[dict[str, Any]]) -> tuple[str, str]:
    name, arguments = "", ""
    for chunk in chunks:
        for choice in chunk["choices"]:
            for piece in choice["delta"].get("tool_calls") or []:
                if piece["index"] == 0:
                    name += piece["function"].get("name", "")
                    arguments += piece["function"].get("arguments", "")
    return name, arguments


def _well_formed(name: str, arguments: str) -> str | None:
    """None for a well-formed call, else what is wrong with it."""
    if name not in SCHEMAS:
        return f"unknown tool {name!r}"
    try:
        value = json.loads(arguments)
    except ValueError:
        return f"arguments are not JSON: {arguments[:80]!r}"
    try:
        jsonschema.validate(value, SCHEMAS[name])
    except jsonschema.ValidationError as exc:
        return f"arguments do not validate: {exc.message[:80]}"
    return None


def _forced_calls(client: httpx.Client, base: str, count: int) -> dict[str, Any]:
    failures, names, seconds = [], [], []
    for i in range(count):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "tools": TOOLS,
            "tool_choice": "required",
            "temperature": 0.8,
            "seed": i,
        }
        chunks, times = _stream(client, base, body)
        name, arguments = _call(chunks)
        problem = _well_formed(name, arguments)
        if problem:
            failures.append({"seed": i, "problem": problem})
        names.append(name)
        seconds.append(times[-1])
        print(
            f"call {i + 1}/{count}: {name} {arguments[:60]} — {problem or 'well-formed'}"
            f" ({times[-1]:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return {
        "calls": count,
        "well_formed": count - len(failures),
        "failures": failures,
        "tools_chosen": {n: names.count(n) for n in sorted(set(names))},
        "median_call_s": statistics.median(seconds),
    }


def _timing(chunks: list[dict[str, Any]], times: list[float]) -> tuple[float, float, int]:
    """Time to first content, time per output token after it, output tokens."""
    firsts = [
        t
        for c, t in zip(chunks, times, strict=True)
        if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    usage = chunks[-1]["usage"]
    tokens = usage["completion_tokens"]
    return firsts[0], (times[-1] - firsts[0]) / max(tokens - 1, 1), tokens


def _constraint_cost(client: httpx.Client, base: str, pairs: int) -> dict[str, Any]:
    base_body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about Paris as a JSON object."}],
        "temperature": 0,
        "max_tokens": 48,
        "stream_options": {"include_usage": True},
    }
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": ANSWER_SCHEMA, "strict": True},
    }
    figures: dict[str, dict[str, list[float]]] = {
        k: {"ttft": [], "tpot": [], "tokens": []} for k in ("text", "json_schema")
    }
    for _ in range(pairs):
        for kind in ("text", "json_schema"):
            body = dict(base_body)
            if kind == "json_schema":
                body["response_format"] = schema_format
            ttft, tpot, tokens = _timing(*_stream(client, base, body))
            figures[kind]["ttft"].append(ttft)
            figures[kind]["tpot"].append(tpot)
            figures[kind]["tokens"].append(tokens)
    return {
        kind: {
            "ttft_ms_p50": 1000 * statistics.median(v["ttft"]),
            "tpot_ms_p50": 1000 * statistics.median(v["tpot"]),
            "tokens_p50": statistics.median(v["tokens"]),
        }
        for kind, v in figures.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--base-url", help="an edge that is already running")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # A SIGTERM (from timeout, say) unwinds like Ctrl-C, so the stack stops its processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        base = args.base_url
        if base is None:
            running = stack.enter_context(
                Stack(
                    REPO / "triton_models",
                    StackPorts.free(),
                    models=("smollm2",),
                    config=REPO / "tokenrelay.toml",
                )
            )
            base = running.edge_url
        client = stack.enter_context(httpx.Client(timeout=120))
        calls = _forced_calls(client, base, args.calls)
        cost = _constraint_cost(client, base, args.pairs)
    share = 100 * calls["well_formed"] / calls["calls"]
    well, total = calls["well_formed"], calls["calls"]
    print(f"forced tool calls on {MODEL}: {well}/{total} well-formed ({share:.0f} %)")
    print(f"tools chosen: {calls['tools_chosen']}; median call {calls['median_call_s']:.2f} s")
    for failure in calls["failures"]:
        print(f"  seed {failure['seed']}: {failure['problem']}")
    print()
    print("| answer | TTFT p50 | time per output token p50 | output tokens p50 |")
    print("|---|---|---|---|")
    for kind, v in cost.items():
        ttft, tpot, tokens = v["ttft_ms_p50"], v["tpot_ms_p50"], v["tokens_p50"]
        print(f"| {kind} | {ttft:.0f} ms | {tpot:.1f} ms | {tokens:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"calls": calls, "constraint_cost": cost}, indent=2))
    return 0 if calls["well_formed"] == calls["calls"] else 1


if __name__ == "__main__":
    sys.exit(main())
