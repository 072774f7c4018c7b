"""What the orchestrator reads from one Triton response (``_triton._decode``), output by output.

Triton sends each requested output as a described tensor plus its raw little-endian contents, in
the order the backend produced them; the relay must find its five outputs by name whatever that
order, ignore outputs it does not read, and not read contents that are missing.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from tritonclient.grpc import service_pb2

from tokenrelay.generation import Delta, FinishReason, Logprob, TokenLogprob
from tokenrelay.orchestrator._triton import _decode

_Output = service_pb2.ModelInferResponse.InferOutputTensor


def _bytes(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _response(outputs: list[tuple[str, str, bytes]], final: bool, raws: int | None = None) -> Any:
    response = service_pb2.ModelInferResponse(
        model_name="m",
        outputs=[_Output(name=n, datatype=d, shape=[1]) for n, d, _ in outputs],
        raw_output_contents=[raw for _, _, raw in outputs][:raws],
    )
    response.parameters["triton_final_response"].bool_param = final
    return response


def test_outputs_are_found_by_name_in_any_order_and_others_ignored() -> None:
    response = _response(
        [
            ("num_output_tokens", "UINT32", struct.pack("<I", 3)),
            ("something_else", "FP32", struct.pack("<f", 1.5)),
            ("finish_reason", "BYTES", _bytes(b"None")),
            ("text_output", "BYTES", _bytes('é \u2028"x"'.encode())),
            ("num_input_tokens", "INT64", struct.pack("<q", 11)),
        ],
        final=False,
    )
    assert _decode(response) == (Delta('é \u2028"x"', 3, 11, None, ()), False)


def test_the_finish_reason_or_the_final_flag_ends_the_stream() -> None:
    stop = _response([("finish_reason", "BYTES", _bytes(b"length"))], final=False)
    assert _decode(stop) == (Delta("", 0, None, FinishReason.LENGTH, ()), True)
    final = _response([("text_output", "BYTES", _bytes(b"!"))], final=True)
    assert _decode(final) == (Delta("!", 0, None, FinishReason.STOP, ()), True)
    aborted = _response([("finish_reason", "BYTES", _bytes(b"ABORT"))], final=True)
    assert _decode(aborted)[0].finish_reason is FinishReason.CANCELLED


def test_missing_contents_and_bad_utf8_are_not_misread() -> None:
    # Described outputs without contents are absent, not read from a neighbour.
    partial = _response(
        [
            ("text_output", "BYTES", _bytes(b"\xffok")),
            ("num_output_tokens", "UINT32", struct.pack("<I", 2)),
            ("num_input_tokens", "UINT32", struct.pack("<I", 5)),
        ],
        final=False,
        raws=2,
    )
    assert _decode(partial) == (Delta("\ufffdok", 2, None, None, ()), False)
    short = _response([("num_output_tokens", "UINT64", b"\x01\x00")], final=False)
    assert _decode(short)[0].output_tokens == 0


def test_logprobs_only_when_asked_for() -> None:
    entries = [
        {
            "7": {"logprob": -0.1, "rank": 2, "decoded_token": "a"},
            "9": {"logprob": -0.05, "rank": 1, "decoded_token": "b"},
        }
    ]
    response = _response(
        [
            ("text_output", "BYTES", _bytes(b"a")),
            ("logprobs", "BYTES", _bytes(json.dumps(entries).encode())),
        ],
        final=False,
    )
    assert _decode(response)[0].logprobs == ()
    expected = (TokenLogprob("a", -0.1, (Logprob("b", -0.05), Logprob("a", -0.1))),)
    assert _decode(response, top_logprobs=2)[0].logprobs == expected
