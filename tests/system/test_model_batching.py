"""SmolLM2 in real tritonserver serves concurrent requests together (continuous batching), and
a request's text does not depend on what else ran beside it."""

from __future__ import annotations

import asyncio

from tokenrelay.config import Timeouts
from tokenrelay.generation import Sampling
from tokenrelay.orchestrator._triton import TritonNode
from tokenrelay.stack import Stack

CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "Why is the sky blue?",
    "Tell me a joke about a cat.",
    "What is 2+2?",
    "Describe a lighthouse.",
    "Give me a reason to learn French.",
)


async def _generate(
    node: TritonNode,
    question: str,
    sampling: Sampling,
    events: list[tuple[str, int]],
    i: int,
    started: asyncio.Event | None = None,
) -> str:
    text = []
    async for delta in node.generate("smollm2", CHATML.format(question), sampling, f"b{i}"):
        if not text:
            events.append(("first", i))
            if started is not None:
                started.set()
        text.append(delta.text)
    events.append(("end", i))
    return "".join(text)


async def test_eight_requests_decode_together_and_each_gives_its_text_alone(stack: Stack) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    try:
        for sampling in (
            Sampling(max_tokens=32, temperature=0.8, seed=3),
            Sampling(max_tokens=32, temperature=0),
        ):
            alone = [await _generate(node, q, sampling, [], i) for i, q in enumerate(QUESTIONS)]
            events: list[tuple[str, int]] = []
            together = await asyncio.gather(
                *(_generate(node, q, sampling, events, i) for i, q in enumerate(QUESTIONS))
            )
            assert list(together) == alone
            # All eight were being decoded before the first one finished: served together, not
            # one after the other as a single-sequence model would.
            first_end = next(n for n, (kind, _) in enumerate(events) if kind == "end")
            assert {i for kind, i in events[:first_end] if kind == "first"} == set(range(8))
        assert len(set(alone)) == len(alone)
    finally:
        await node.close()


async def test_a_request_joining_a_running_batch_changes_no_text(stack: Stack) -> None:
    node = TritonNode(stack.triton_grpc, Timeouts())
    sampling = Sampling(max_tokens=40, temperature=0.7, seed=21)
    try:
        alone = [await _generate(node, q, sampling, [], i) for i, q in enumerate(QUESTIONS[:4])]
        events: list[tuple[str, int]] = []
        tasks = []
        for i, question in enumerate(QUESTIONS[:4]):
            started = asyncio.Event()
            tasks.append(
                asyncio.create_task(_generate(node, question, sampling, events, i, started))
            )
            # The next one arrives while this one (and those before it) are decoding.
            await started.wait()
        assert [await t for t in tasks] == alone
        # Each joined while the first was still decoding.
        assert events.index(("first", 3)) < events.index(("end", 0))
    finally:
        await node.close()
