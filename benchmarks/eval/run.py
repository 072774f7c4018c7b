"""Answer quality of the CPU model, through the edge: how many of the questions in
``questions.json`` get an accepted answer, for several system prompts.

    .venv/bin/python benchmarks/eval/run.py [--out results/eval] [--max-tokens 64]
        [--prompts none,smollm2,catalog,"You are a helpful assistant."]
        [--url http://127.0.0.1:8080] [--show-failures]

Without ``--url`` it starts a stack of its own (tritonserver with ``smollm2``, orchestrator, edge
on free loopback ports) whose catalog entry has no default system prompt, and asks every question
once per system prompt in ``--prompts`` (sent as the conversation's system message): ``none`` asks
with no system prompt at all, ``smollm2`` with SmolLM2's own (its Hugging Face chat template's
default, which has a comma and so cannot be given as text here), ``catalog`` with the default
system prompt of this checkout's catalog (``Settings``), anything else is used as the text.
The default, ``none,smollm2``, is the comparison that chose the catalog's default. With ``--url``
it asks a running edge (e.g. ``make run``) as it is, under the name ``served``. Temperature 0, so
a run is repeatable; an answer is correct when the question's ``accept`` expression matches it
(case-insensitive). Prints a table and writes ``results.json`` (every answer) to ``--out``.
Figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.config import Settings  # noqa: E402
from tokenrelay.stack import Stack, StackPorts  # noqa: E402

MODEL = "smollm2-135m-instruct"
# The default system prompt of SmolLM2-Instruct's own chat template (tokenizer_config.json).
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def load_questions(path: Path = HERE / "questions.json") -> list[dict[str, Any]]:
    """The questions, each with ``id``, ``ask``, ``accept`` and optional ``turns``/``readme``."""
    questions: list[dict[str, Any]] = json.loads(path.read_text())["questions"]
    for question in questions:
        re.compile(question["accept"])
    return questions


def messages(question: dict[str, Any], system: str | None) -> list[dict[str, str]]:
    """The chat messages that ask ``question``, after ``system`` if given."""
    turns = [{"role": role, "content": text} for role, text in question.get("turns", [])]
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *turns, {"role": "user", "content": question["ask"]}]


def accepted(question: dict[str, Any], answer: str) -> bool:
    return re.search(question["accept"], answer, re.IGNORECASE) is not None


async def _ask(
    session: aiohttp.ClientSession, url: str, chat: list[dict[str, str]], max_tokens: int
) -> str:
    body = {"model": MODEL, "messages": chat, "temperature": 0, "max_tokens": max_tokens}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        reply = await response.json()
    return str(reply["choices"][0]["message"]["content"])


async def _evaluate(
    url: str, prompts: dict[str, str | None], max_tokens: int
) -> dict[str, list[dict[str, Any]]]:
    questions = load_questions()
    results: dict[str, list[dict[str, Any]]] = {}
    timeout = aiohttp.ClientTimeout(total=300)
    # Eight at a time, as many as the model's slots: it batches them, and at temperature 0 the
    # answers are the same as one by one.
    slots = asyncio.Semaphore(8)

    async def ask(session: aiohttp.ClientSession, chat: list[dict[str, str]]) -> str:
        async with slots:
            return await _ask(session, url, chat, max_tokens)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        for name, system in prompts.items():
            answers = await asyncio.gather(*(ask(session, messages(q, system)) for q in questions))
            results[name] = [
                {"id": q["id"], "answer": a, "correct": accepted(q, a)}
                for q, a in zip(questions, answers, strict=True)
            ]
    return results


def _prompt_table(names: list[str]) -> dict[str, str | None]:
    catalog = next(m for m in Settings().models if m.id == MODEL).default_system_prompt
    table: dict[str, str | None] = {}
    for name in names:
        named = {"none": None, "smollm2": SMOLLM2_SYSTEM, "catalog": catalog or None}
        table[name] = named.get(name, name)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--prompts",
        default="none,smollm2",
        help="comma-separated: none, smollm2, catalog, or system prompt texts",
    )
    parser.add_argument("--url", help="a running edge to ask as it is")
    parser.add_argument("--show-failures", action="store_true")
    args = parser.parse_args(argv)
    if args.url:
        results = asyncio.run(_evaluate(args.url, {"served": None}, args.max_tokens))
    else:
        prompts = _prompt_table([p for p in args.prompts.split(",") if p])
        with tempfile.TemporaryDirectory() as workdir:
            config = Path(workdir) / "tokenrelay.toml"
            config.write_text(
                f'[[models]]\nid = "{MODEL}"\ntriton_model = "smollm2"\n'
                'chat_template = "chatml"\ndefault_system_prompt = ""\ncontext_window = 2048\n'
            )
            stack = Stack(
                REPO / "triton_models", StackPorts.free(), models=("smollm2",), config=config
            )
            stack.start()
            try:
                results = asyncio.run(_evaluate(stack.edge_url, prompts, args.max_tokens))
            finally:
                stack.stop()
    total = len(load_questions())
    print(f"\n| system prompt | correct (of {total}) |\n|---|---|")
    for name, rows in results.items():
        label = "(none)" if name == "none" else name
        print(f"| {label} | {sum(r['correct'] for r in rows)} |")
    if args.show_failures:
        for name, rows in results.items():
            for row in rows:
                if not row["correct"]:
                    print(f"{name[:24]:24} {row['id']:20} {row['answer'][:70]!r}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        arguments = {k: str(v) for k, v in vars(args).items() if k != "out"}
        (args.out / "results.json").write_text(
            json.dumps({"arguments": arguments, "results": results}, indent=1, ensure_ascii=False)
        )


if __name__ == "__main__":
    main()
