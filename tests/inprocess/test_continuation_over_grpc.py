"""A continued answer as gRPC callers see it: ``end.continued``, ``GenerateResponse.continued``
and the ``tokenrelay-continued`` trailer (orchestrator on port 0, two fake nodes)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from _support import ContinuingSource
from tokenrelay.config import OrchestratorSettings, Settings
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

WORDS = tuple(f" w{i}" for i in range(12))


class FirstFails(ContinuingSource):
    """Of the nodes sharing ``failures``, the first generations (one per failure) fail after
    four words: whichever node routing picks first breaks, and the other continues."""

    def __init__(self, name: str, failures: list[int]) -> None:
        super().__init__(name, WORDS)
        self.failures = failures

    def generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.failures[0]:
            self.failures[0] -= 1
            self.fail_after = 4
        return super().generate(*args, **kwargs)


@pytest.fixture
async def nodes() -> tuple[FirstFails, FirstFails]:
    failures = [0]
    return FirstFails("a:1", failures), FirstFails("b:1", failures)


@pytest.fixture
async def stub(
    nodes: tuple[FirstFails, FirstFails],
) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=tuple(n.name for n in nodes), metrics_listen="127.0.0.1:0"
        )
    )
    orchestrator = Orchestrator(settings, sources={n.name: n for n in nodes})
    await orchestrator.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        yield pb_grpc.GenerationServiceStub(channel)
    await orchestrator.stop(grace_s=0)


def _fail_the_first_node(nodes: tuple[FirstFails, FirstFails]) -> None:
    nodes[0].failures[0] = 1


async def test_a_continued_stream_says_so_in_its_end_and_its_trailer(
    nodes: tuple[FirstFails, FirstFails], stub: pb_grpc.GenerationServiceStub
) -> None:
    _fail_the_first_node(nodes)
    request = pb.GenerateStreamRequest(model="synthetic", prompt="go")
    call = stub.GenerateStream(request)
    messages = [message async for message in call]
    assert "".join(m.text for m in messages) == "".join(WORDS)
    assert [m.HasField("start") for m in messages].count(True) == 1
    end = messages[-1].end
    assert end.finish_reason == pb.FINISH_REASON_STOP
    assert end.continued.count == 1 and end.continued.usage.completion_tokens == 8
    assert end.usage.completion_tokens == 12
    assert end.usage.prompt_tokens == 1 + len(("go" + "".join(WORDS[:4])).split())
    assert ("tokenrelay-continued", "1") in tuple(await call.trailing_metadata())


async def test_a_whole_answer_that_was_continued_says_so(
    nodes: tuple[FirstFails, FirstFails], stub: pb_grpc.GenerationServiceStub
) -> None:
    _fail_the_first_node(nodes)
    call = stub.Generate(pb.GenerateRequest(model="synthetic", prompt="go"))
    response = await call
    assert response.text == "".join(WORDS) and response.continued.count == 1
    assert ("tokenrelay-continued", "1") in tuple(await call.trailing_metadata())


async def test_an_answer_that_was_not_continued_has_no_trailer(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    call = stub.GenerateStream(pb.GenerateStreamRequest(model="synthetic", prompt="go"))
    messages = [message async for message in call]
    assert not messages[-1].end.HasField("continued")
    assert "tokenrelay-continued" not in dict(await call.trailing_metadata() or ())
