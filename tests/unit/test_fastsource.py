"""The benchmark's fast token source answers with tritonserver's own bytes.

The expected responses were captured from tritonserver 2.51 (the nvidia-pytriton wheel) serving
``triton_models/synthetic`` to the orchestrator's request for ``max_tokens: 3``, request id
``rid-1``, prompt ``hello world``: the relay reads the same messages from either. With a stream
interval, the orchestrator's node passes it on and the source merges by it, as tokenrelay's vLLM
model does.
"""

from __future__ import annotations

import sys

import grpc
from tritonclient.grpc import service_pb2

from _support import REPO
from tokenrelay.config import Timeouts
from tokenrelay.generation import Delta, FinishReason, Sampling
from tokenrelay.orchestrator._triton import TritonNode, _decode

sys.path.insert(0, str(REPO / "benchmarks"))
from fastsource import FastSource, encode_response

_HEAD = b'\n\tsynthetic\x12\x011\x1a\x05rid-1"\x1b\n\x15triton_final_response\x12\x02\x08'
_DESCRIBED = (
    b"*\x17\n\x0btext_output\x12\x05BYTES\x1a\x01\x01*\x19\n\rfinish_reason\x12\x05BYTES\x1a\x01"
    b"\x01*\x1d\n\x10num_input_tokens\x12\x06UINT32\x1a\x01\x01*\x1e\n\x11num_output_tokens\x12"
    b"\x06UINT32\x1a\x01\x01"
)
_COUNTS = b"2\x04\x02\x00\x00\x002\x04\x01\x00\x00\x00"  # 2 prompt tokens, 1 output token
CAPTURED = {
    ("jumps", None): b"\x12\xc6\x01"
    + _HEAD
    + b"\x00"
    + _DESCRIBED
    + b"2\t\x05\x00\x00\x00jumps2\x08\x04\x00\x00\x00None"
    + _COUNTS,
    (" jumps", "length"): b"\x12\xc9\x01"
    + _HEAD
    + b"\x01"
    + _DESCRIBED
    + b"2\n\x06\x00\x00\x00 jumps2\n\x06\x00\x00\x00length"
    + _COUNTS,
}


def test_responses_are_byte_identical_to_tritonservers() -> None:
    for (text, finish), expected in CAPTURED.items():
        assert encode_response("synthetic", "rid-1", text, finish, prompt_tokens=2) == expected


def _decoded(raw: bytes) -> tuple[Delta, bool]:
    return _decode(service_pb2.ModelStreamInferResponse.FromString(raw).infer_response)


def test_the_relay_decodes_them_as_deltas() -> None:
    delta, final = _decoded(encode_response("synthetic", "r", " fox", None, 7))
    assert (delta.text, delta.output_tokens, delta.prompt_tokens, final) == (" fox", 1, 7, False)
    delta, final = _decoded(encode_response("synthetic", "r", " dog", "length", 7))
    assert (delta.text, delta.finish_reason, final) == (" dog", FinishReason.LENGTH, True)


async def _deltas(stream_interval_ms: int, honour: bool = True) -> list[Delta]:
    """20 tokens 2 ms apart from a fast source on loopback, read by the orchestrator's node."""
    source = FastSource(["synthetic"], interval_s=0.002, honour_stream_interval=honour)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((source.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    node = TritonNode(f"127.0.0.1:{port}", Timeouts())
    try:
        sampling = Sampling(max_tokens=20, stream_interval_ms=stream_interval_ms)
        return [d async for d in node.generate("synthetic", "hello world", sampling, "r")]
    finally:
        await node.close()
        await server.stop(0)


async def test_the_stream_interval_reaches_the_source_which_merges_by_it() -> None:
    # The orchestrator's node sends the interval as a request parameter; the source (as
    # tokenrelay's vLLM model) sends the first token alone, then what is due every 30 ms.
    each = await _deltas(0)
    merged = await _deltas(30)
    ignored = await _deltas(30, honour=False)
    assert len(each) == len(ignored) == 20
    assert merged[0].output_tokens == 1 and 2 <= len(merged) <= 5
    for deltas in (each, merged, ignored):
        assert "".join(d.text for d in deltas) == "".join(d.text for d in each)
        assert sum(d.output_tokens for d in deltas) == 20
        assert deltas[-1].finish_reason is FinishReason.LENGTH
