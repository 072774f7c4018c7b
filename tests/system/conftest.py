"""The system tier's stack: real processes on free loopback ports, started once per session —
or, with ``TOKENRELAY_TEST_STACK`` set, the running stack it names (``_support.target``)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from _support import REPO
from _support.target import StackUnderTest, TargetStack, target_from_env
from tokenrelay.stack import Stack, StackPorts


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack | TargetStack]:
    target = target_from_env()
    if target is not None:
        yield target
        return
    # fast_stop: no test watches this stack stop (test_lifecycle's stacks stop gracefully).
    with Stack(
        REPO / "triton_models", StackPorts.free(), config=REPO / "tokenrelay.toml", fast_stop=True
    ) as running:
        yield running


@pytest.fixture
def client(stack: StackUnderTest) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.edge_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk
