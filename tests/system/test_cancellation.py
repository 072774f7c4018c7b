"""A client that is done with a stream stops the generation inside Triton: a chat completion's by
saying so (its stream is resumable, so a dropped connection alone waits for its grace period:
tests/system/test_streams.py), a text completion's by going away."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from _support import triton_metric, wait_until
from tokenrelay.stack import Stack

TOKENS = "tokenrelay_model_generated_tokens_total"
REQUESTS = "tokenrelay_model_requests_total"


@pytest.mark.parametrize(
    ("model", "triton_model", "body"),
    [
        ("synthetic", "synthetic", {"messages": [{"role": "user", "content": "go"}]}),
        ("synthetic", "synthetic", {"prompt": "go"}),
        (
            "smollm2-135m-instruct",
            "smollm2",
            {
                "messages": [
                    {"role": "user", "content": "Write a very long story about a dragon."}
                ],
                "temperature": 0.8,
            },
        ),
    ],
)
def test_disconnect_cancels_generation_in_triton(
    stack: Stack, model: str, triton_model: str, body: dict[str, object]
) -> None:
    max_tokens = 1500
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


async def test_a_client_that_goes_away_leaves_the_others_in_the_batch_unharmed(
    stack: Stack,
) -> None:
    """Three streams decode together; the one whose client stops and leaves ends in Triton, the
    other two finish with exactly the text they give alone."""

    def body(question: str) -> dict[str, object]:
        return {
            "model": "smollm2-135m-instruct",
            "stream": True,
            "max_tokens": 48,
            "temperature": 0.8,
            "seed": 5,
            "messages": [{"role": "user", "content": question}],
        }

    async def text_of(client: httpx.AsyncClient, question: str, leave_after: int = 0) -> str:
        parts = []
        async with client.stream(
            "POST", f"{stack.edge_url}/v1/chat/completions", json=body(question)
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    parts.append(chunk["choices"][0]["delta"].get("content") or "")
                if leave_after and len(parts) == leave_after:
                    # Stop, as the chat page's button does (a dropped connection alone would
                    # wait for its grace period: the stream is resumable), then go away.
                    cancel = f"{stack.edge_url}/v1/chat/completions/{chunk['id']}/cancel"
                    assert (await client.post(cancel)).status_code == 200
                    break  # leaving the block closes the connection mid-stream
        return "".join(parts)

    questions = ("Name three colours.", "Why is the sky blue?")
    cancelled_before = triton_metric(
        stack.triton_metrics_url, REQUESTS, model="smollm2", outcome="cancelled"
    )
    async with httpx.AsyncClient(timeout=120) as client:
        alone = [await text_of(client, q) for q in questions]
        results = await asyncio.gather(
            text_of(client, "Write a very long story about a dragon.", leave_after=4),
            *(text_of(client, q) for q in questions),
        )
    assert list(results[1:]) == alone
    assert wait_until(
        lambda: (
            triton_metric(stack.triton_metrics_url, REQUESTS, model="smollm2", outcome="cancelled")
            == cancelled_before + 1
        )
    )
