"""A client that is done with a stream stops the generation inside Triton: a chat completion's by
saying so (its stream is resumable, so a dropped connection alone waits for its grace period:
tests/system/test_streams.py), a text completion's by going away. SmolLM2's cases hold on any
backend (marked ``any_backend``: Triton's vLLM model counts the same metrics)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from _support import triton_metric, wait_until
from _support.target import MODELS, StackUnderTest
from _support.triton import settled

TOKENS = "tokenrelay_model_generated_tokens_total"
REQUESTS = "tokenrelay_model_requests_total"


@pytest.mark.parametrize(
    ("model", "triton_model", "body"),
    [
        ("synthetic", "synthetic", {"messages": [{"role": "user", "content": "go"}]}),
        ("synthetic", "synthetic", {"prompt": "go"}),
        pytest.param(
            MODELS.chat,
            MODELS.triton,
            {
                "messages": [
                    {"role": "user", "content": "Write a very long story about a dragon."}
                ],
                "temperature": 0.8,
            },
            marks=pytest.mark.any_backend,
        ),
    ],
)
def test_disconnect_cancels_generation_in_triton(
    stack: StackUnderTest, model: str, triton_model: str, body: dict[str, object]
) -> None:
    max_tokens = 1500
    assert settled(stack.triton_metrics_url), "the model's counters kept changing"
    cancelled_before = triton_metric(
        stack.triton_metrics_url, REQUESTS, model=triton_model, outcome="cancelled"
    )
    tokens_before = triton_metric(stack.triton_metrics_url, TOKENS, model=triton_model)
    request = {"model": model, "stream": True, "max_tokens": max_tokens, **body}
    chunks = 0
    chat = "messages" in body
    route = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", f"{stack.edge_url}{route}", json=request, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
                stream_id = json.loads(line[6:])["id"]
            if chunks == 4:
                if chat:  # as the chat page's Stop does
                    cancel = f"{stack.edge_url}/v1/chat/completions/{stream_id}/cancel"
                    assert httpx.post(cancel, timeout=5).status_code == 200
                break  # leaving the block closes the connection mid-stream
    assert wait_until(
        lambda: (
            triton_metric(
                stack.triton_metrics_url, REQUESTS, model=triton_model, outcome="cancelled"
            )
            == cancelled_before + 1
        )
    ), "Triton did not count a cancelled request"
    generated = triton_metric(stack.triton_metrics_url, TOKENS, model=triton_model) - tokens_before
    time.sleep(0.5)  # no more tokens after the cancellation
    assert (
        triton_metric(stack.triton_metrics_url, TOKENS, model=triton_model) - tokens_before
        == generated
    )
    assert 3 <= generated < max_tokens / 10


@pytest.mark.any_backend
async def test_a_client_that_goes_away_leaves_the_others_in_the_batch_unharmed(
    stack: StackUnderTest,
) -> None:
    """Three streams decode together; the one whose client leaves (a text completion's: a chat
    completion's stream would wait for a resume) ends in Triton, the other two finish with
    exactly the text they give alone."""

    def body(question: str) -> dict[str, object]:
        return {
            "model": MODELS.chat,
            "stream": True,
            "max_tokens": 48,
            "temperature": 0.8,
            "seed": 5,
            "messages": [{"role": "user", "content": question}],
        }

    async def text_of(client: httpx.AsyncClient, question: str) -> str:
        parts = []
        async with client.stream(
            "POST", f"{stack.edge_url}/v1/chat/completions", json=body(question)
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                if choices:
                    parts.append(choices[0]["delta"].get("content") or "")
        return "".join(parts)

    async def leave(client: httpx.AsyncClient) -> str:
        story = {
            "model": MODELS.chat,
            "stream": True,
            "max_tokens": 1500,  # far more than it gets to write before its client leaves
            "prompt": "Once upon a time, a dragon",
        }
        chunks = 0
        async with client.stream("POST", f"{stack.edge_url}/v1/completions", json=story) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 4:
                    break  # leaving the block closes the connection mid-stream
        return ""

    questions = ("Name three colours.", "Why is the sky blue?")
    assert settled(stack.triton_metrics_url), "the model's counters kept changing"
    cancelled_before = triton_metric(
        stack.triton_metrics_url, REQUESTS, model=MODELS.triton, outcome="cancelled"
    )
    async with httpx.AsyncClient(timeout=120) as client:
        alone = [await text_of(client, q) for q in questions]
        results = await asyncio.gather(leave(client), *(text_of(client, q) for q in questions))
    assert list(results[1:]) == alone
    assert wait_until(
        lambda: (
            triton_metric(
                stack.triton_metrics_url, REQUESTS, model=MODELS.triton, outcome="cancelled"
            )
            == cancelled_before + 1
        )
    )
