"""The README's example questions get a correct answer from SmolLM2 through the edge, at
temperature 0, with the catalog's default template and system prompt (the ones that scored best
on benchmarks/eval)."""

from __future__ import annotations

import json
import re

import openai
import pytest

from _support import REPO

EXAMPLES = [
    q
    for q in json.loads((REPO / "benchmarks" / "eval" / "questions.json").read_text())["questions"]
    if q.get("readme")
]


def test_the_readme_asks_these_questions() -> None:
    readme = (REPO / "README.md").read_text()
    assert {"What is the capital of France?", "Write a haiku about the sea."} <= {
        q["ask"] for q in EXAMPLES
    }
    assert all(q["ask"] in readme for q in EXAMPLES)


@pytest.mark.parametrize("question", EXAMPLES, ids=[q["id"] for q in EXAMPLES])
def test_readme_example_gets_a_correct_answer(
    client: openai.OpenAI, question: dict[str, str]
) -> None:
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": question["ask"]}],
        temperature=0,
        max_tokens=64,
    )
    answer = reply.choices[0].message.content or ""
    assert re.search(question["accept"], answer, re.IGNORECASE), answer
