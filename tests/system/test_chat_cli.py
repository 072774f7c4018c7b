"""``tokenrelay chat`` against the running stack, through the edge and straight over gRPC."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenrelay.stack import Stack


def _chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay.cli", "chat", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


@pytest.mark.parametrize("via", ["edge", "grpc"])
def test_chat_streams_an_answer_and_summarises_it(stack: Stack, via: str) -> None:
    where = ["--url", stack.edge_url] if via == "edge" else ["--grpc", stack.orchestrator_address]
    done = _chat(*where, "--model", "synthetic", "--max-tokens", "7", "Say something.")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 7  # the synthetic model's seven words
    assert "synthetic" in done.stderr and ", 7 tokens," in done.stderr
    if via == "grpc":
        assert stack.triton_grpc in done.stderr  # the node that served


def test_chat_reads_a_conversation_from_stdin(stack: Stack) -> None:
    done = _chat(
        "--url",
        stack.edge_url,
        "--model",
        "synthetic",
        "--max-tokens",
        "3",
        stdin="first question\nsecond question\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(", 3 tokens,") == 2  # two turns answered


def test_chat_says_why_a_request_was_refused(stack: Stack) -> None:
    done = _chat("--url", stack.edge_url, "--model", "no-such-model", "hi")
    assert done.returncode == 1
    assert "HTTP 404" in done.stderr and "no-such-model" in done.stderr
    done = _chat(
        "--grpc", stack.orchestrator_address, "--model", "synthetic", "--max-tokens", "0", "hi"
    )
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr
