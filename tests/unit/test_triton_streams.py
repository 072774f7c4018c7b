"""A Triton node's generation streams read either way (``triton_streams``: ``h2``, the default,
or ``grpc``) give the same deltas and the same errors, from a gRPC server speaking Triton's
``ModelStreamInfer`` (the benchmark's fast source, and one that fails as Triton fails)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from _support import REPO
from tokenrelay.config import Timeouts
from tokenrelay.errors import GenerationFailed, InvalidRequest, UpstreamUnavailable
from tokenrelay.generation import FinishReason, Sampling
from tokenrelay.orchestrator._triton import TritonNode

sys.path.insert(0, str(REPO / "benchmarks"))
from fastsource import FastSource

_SERVICE = "inference.GRPCInferenceService"


class _Failing:
    """``ModelStreamInfer`` failing as Triton fails, by the prompt's first word; counts the
    calls that were cancelled."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def stream(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        request = await anext(aiter(requests))
        if b"refuse" in request:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1")
        if b"gone" in request:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model not ready")
        if b"crash" in request:
            await context.abort(grpc.StatusCode.INTERNAL, "CUDA error: an illegal memory access")
        try:
            await asyncio.sleep(30)  # "hang": until cancelled
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b""

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(self.stream)
        return grpc.method_handlers_generic_handler(_SERVICE, {"ModelStreamInfer": method})


@pytest.fixture
async def servers() -> AsyncIterator[tuple[str, str, _Failing]]:
    fast, failing = grpc.aio.server(), grpc.aio.server()
    fast.add_generic_rpc_handlers((FastSource(["synthetic"], interval_s=0.0).handler(),))
    state = _Failing()
    failing.add_generic_rpc_handlers((state.handler(),))
    ports = fast.add_insecure_port("127.0.0.1:0"), failing.add_insecure_port("127.0.0.1:0")
    await fast.start()
    await failing.start()
    yield f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", state
    await fast.stop(0)
    await failing.stop(0)


@pytest.mark.parametrize("streams", ["h2", "grpc"])
async def test_both_clients_read_the_same_answer_and_fail_alike(
    servers: tuple[str, str, _Failing], streams: str
) -> None:
    fast, failing, state = servers
    node = TritonNode(fast, Timeouts(), streams=streams)
    assert (node._h2 is not None) is (streams == "h2")
    try:
        answers = await asyncio.gather(
            *(_collect(node, "hello world", Sampling(max_tokens=12 + i), f"r{i}") for i in range(8))
        )
        for i, deltas in enumerate(answers):
            assert sum(d.output_tokens for d in deltas) == 12 + i
            assert deltas[0].prompt_tokens == 2
            assert deltas[-1].finish_reason is FinishReason.LENGTH
            assert all(d.finish_reason is None for d in deltas[:-1])
    finally:
        await node.close()
    node = TritonNode(failing, Timeouts(), streams=streams)
    try:
        with pytest.raises(InvalidRequest):
            await _collect(node, "refuse", Sampling(max_tokens=4), "a")
        with pytest.raises(UpstreamUnavailable):
            await _collect(node, "gone", Sampling(max_tokens=4), "b")
        with pytest.raises(GenerationFailed):
            await _collect(node, "crash", Sampling(max_tokens=4), "c")
        # A caller that stops early cancels the Triton request.
        task = asyncio.create_task(_collect(node, "hang", Sampling(max_tokens=4), "d"))
        await asyncio.sleep(0.2)
        task.cancel()
        async with asyncio.timeout(5):
            await state.cancelled.wait()
    finally:
        await node.close()
    node = TritonNode("127.0.0.1:1", Timeouts(), streams=streams)  # nothing listens there
    try:
        with pytest.raises(UpstreamUnavailable):
            await _collect(node, "hello", Sampling(max_tokens=4), "e")
    finally:
        await node.close()


async def _collect(node: TritonNode, prompt: str, sampling: Sampling, request_id: str) -> list[Any]:
    return [d async for d in node.generate("synthetic", prompt, sampling, request_id)]
