"""A client that goes away mid-stream stops the generation inside Triton."""

from __future__ import annotations

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
    with httpx.stream(
        "POST", f"{stack.edge_url}/v1/chat/completions", json=request, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 4:
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
