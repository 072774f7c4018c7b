"""The benchmark's fast token source answers with tritonserver's own bytes.

The expected responses were captured from tritonserver 2.51 (the nvidia-pytriton wheel) serving
``triton_models/synthetic`` to the orchestrator's request for ``max_tokens: 3``, request id
``rid-1``, prompt ``hello world``: the relay reads the same messages from either.
"""

from __future__ import annotations

import sys

from tritonclient.grpc import service_pb2

from _support import REPO
from tokenrelay.generation import Delta, FinishReason
from tokenrelay.orchestrator._triton import _decode

sys.path.insert(0, str(REPO / "benchmarks"))
from fastsource import encode_response

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
