"""A Triton-protocol token source fast enough to load the relay past the model (benchmarks only).

    .venv/bin/python benchmarks/fastsource.py --port 0 [--token-interval-ms 0] [--models synthetic]

Triton's Python-backend synthetic model saturates at about 2,500 to 2,900 responses/s on this
machine's two cores, below what the relay can carry, so it cannot show where the relay's limit
is. This server speaks the same gRPC service (``inference.GRPCInferenceService``: ``ServerLive``,
``ServerReady``, ``ModelReady``, ``ModelStreamInfer``) and answers a stream the way tritonserver
2.51 answers it for a decoupled model with the vLLM backend's outputs: one
``ModelStreamInferResponse`` per token, carrying ``text_output``, ``finish_reason``,
``num_input_tokens`` and ``num_output_tokens`` as raw little-endian contents, the
``triton_final_response`` parameter true on the last one (which carries the last token).

Why its figures compare with Triton's: the relay reads exactly the bytes it would read from
tritonserver — ``tests/unit/test_fastsource.py`` checks that a response of this server is
byte-identical to one captured from tritonserver 2.51 serving ``triton_models/synthetic`` — over
the same HTTP/2 transport, one stream per request, with the same request (it parses
``text_input``, ``sampling_parameters`` and the requested outputs as Triton does). What differs
is the cost on the far side: messages are pre-encoded, so one core sends tens of thousands a
second, and ``--token-interval-ms`` paces each stream (0: as fast as the reader takes them).

A request's ``stream_interval_ms`` parameter (which the orchestrator sends when it relays at a
stream interval) is honoured as tokenrelay's vLLM and CPU models honour it: after the first
token, a response waits until that long after the previous one and carries every token due by
then (``--stream-interval ignore``: one response per token whatever the request says, as
Triton's vLLM backend answers). Unpaced, every token is due at once, so the rest of the
answer comes in one response after the interval.

Not modelled: stop sequences, seeds, cancellation statistics, errors. Prints ``listening on
PORT`` once it serves, then runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

__all__ = ["FastSource", "encode_response"]

_SERVICE = "inference.GRPCInferenceService"
_WORDS = (
    "the quick brown fox jumps over a lazy dog while streams of tokens flow through"
    " every relay and each hop adds almost nothing"
).split()
_OUTPUTS = {
    "text_output": "BYTES",
    "finish_reason": "BYTES",
    "num_input_tokens": "UINT32",
    "num_output_tokens": "UINT32",
}
_U32 = struct.Struct("<I")
_STREAM_INTERVAL = "stream_interval_ms"  # tokenrelay.triton_python._contract's request parameter


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_element(value: bytes) -> bytes:
    """One BYTES tensor element as Triton lays it out raw: a 4-byte length, then the bytes."""
    return _U32.pack(len(value)) + value


class _Encoder:
    """Pre-encoded parts of one stream's responses. Protobuf fields written in field order and
    concatenated are the message (repeated fields in order), so each response is a few bytes
    joined instead of a message built and serialized."""

    def __init__(self, model: str, request_id: str, outputs: Sequence[str], prompt_tokens: int):
        head = service_pb2.ModelInferResponse(model_name=model, model_version="1", id=request_id)
        described = service_pb2.ModelInferResponse(
            outputs=[
                service_pb2.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=_OUTPUTS[name], shape=[1]
                )
                for name in outputs
            ]
        )
        self._head = head.SerializeToString()
        self._final = {
            flag: service_pb2.ModelInferResponse(
                parameters={"triton_final_response": service_pb2.InferParameter(bool_param=flag)}
            ).SerializeToString()
            for flag in (False, True)
        }
        self._described = described.SerializeToString()
        self._outputs = tuple(outputs)
        self._prompt = _U32.pack(prompt_tokens)

    def encode(self, text: str, finish: str | None, tokens: int = 1) -> bytes:
        raw = []
        for name in self._outputs:
            if name == "text_output":
                raw.append(_field(6, _bytes_element(text.encode())))
            elif name == "finish_reason":
                raw.append(_field(6, _bytes_element((finish or "None").encode())))
            elif name == "num_input_tokens":
                raw.append(_field(6, self._prompt))
            else:
                raw.append(_field(6, _U32.pack(tokens)))
        inner = self._head + self._final[finish is not None] + self._described + b"".join(raw)
        return _field(2, inner)  # ModelStreamInferResponse.infer_response


def encode_response(
    model: str,
    request_id: str,
    text: str,
    finish: str | None,
    prompt_tokens: int,
    outputs: Sequence[str] = tuple(_OUTPUTS),
) -> bytes:
    """One serialized ``ModelStreamInferResponse`` as this server sends it (for tests)."""
    return _Encoder(model, request_id, outputs, prompt_tokens).encode(text, finish)


def _inputs(request: Any) -> dict[str, bytes]:
    """A request's BYTES/BOOL inputs as raw contents, by name."""
    raws = request.raw_input_contents
    return {tensor.name: raws[i] for i, tensor in enumerate(request.inputs) if i < len(raws)}


def _first_bytes(raw: bytes | None) -> bytes:
    if not raw or len(raw) < 4:
        return b""
    (length,) = _U32.unpack_from(raw)
    return raw[4 : 4 + length]


class FastSource:
    """The server: every model in ``models`` is ready, and streams ``default_tokens`` tokens
    (or the request's ``max_tokens``), one every ``interval_s`` (0: unpaced)."""

    def __init__(
        self,
        models: Sequence[str],
        interval_s: float = 0.0,
        default_tokens: int = 64,
        honour_stream_interval: bool = True,
    ) -> None:
        self._models = set(models)
        self._interval = interval_s
        self._default_tokens = default_tokens
        self._honour = honour_stream_interval
        self.streams = 0
        self.responses = 0

    async def _stream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            if request.model_name not in self._models:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}'"
                )
            self.streams += 1
            inputs = _inputs(request)
            prompt = _first_bytes(inputs.get("text_input")).decode("utf-8", "replace")
            sampling = json.loads(_first_bytes(inputs.get("sampling_parameters")) or b"{}")
            limited = sampling.get("max_tokens") is not None
            count = int(sampling["max_tokens"]) if limited else self._default_tokens
            outputs = [o.name for o in request.outputs if o.name in _OUTPUTS] or list(_OUTPUTS)
            encoder = _Encoder(request.model_name, request.id, outputs, max(1, len(prompt.split())))
            merge_s = 0.0
            if self._honour and _STREAM_INTERVAL in request.parameters:
                merge_s = request.parameters[_STREAM_INTERVAL].int64_param / 1000
            interval = self._interval
            began = time.monotonic()
            i, sent = 0, 0.0
            while i < count:
                due = began + i * interval  # token i's time
                if i and merge_s:
                    due = max(due, sent + merge_s)
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                end = i + 1
                if i and merge_s:  # every token due by now rides along
                    elapsed = time.monotonic() - began
                    end = (
                        count if not interval else min(count, max(end, int(elapsed / interval) + 1))
                    )
                text = "".join(
                    ("" if k == 0 else " ") + _WORDS[k % len(_WORDS)] for k in range(i, end)
                )
                finish = ("length" if limited else "stop") if end == count else None
                self.responses += 1
                yield encoder.encode(text, finish, end - i)
                sent, i = time.monotonic(), end

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(reply: Any) -> grpc.RpcMethodHandler[Any, Any]:
            async def answer(request: Any, context: Any) -> Any:
                return reply(request)

            return grpc.unary_unary_rpc_method_handler(
                answer,
                request_deserializer=lambda raw: raw,
                response_serializer=lambda message: message.SerializeToString(),
            )

        methods = {
            "ServerLive": unary(lambda _: service_pb2.ServerLiveResponse(live=True)),
            "ServerReady": unary(lambda _: service_pb2.ServerReadyResponse(ready=True)),
            "ModelReady": unary(
                lambda raw: service_pb2.ModelReadyResponse(
                    ready=service_pb2.ModelReadyRequest.FromString(raw).name in self._models
                )
            ),
            # Responses are bytes already: no serializer.
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=service_pb2.ModelInferRequest.FromString
            ),
        }
        return grpc.method_handlers_generic_handler(_SERVICE, methods)


async def _serve(args: argparse.Namespace) -> None:
    source = FastSource(
        args.models.split(","),
        args.token_interval_ms / 1000,
        args.default_tokens,
        honour_stream_interval=args.stream_interval == "honour",
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((source.handler(),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"listening on {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    print(f"served {source.streams} streams, {source.responses} responses", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--models", default="synthetic", help="comma-separated model names")
    parser.add_argument("--token-interval-ms", type=float, default=0.0, help="0: unpaced")
    parser.add_argument("--default-tokens", type=int, default=64)
    parser.add_argument(
        "--stream-interval",
        default="honour",
        choices=("honour", "ignore"),
        help="a request's stream_interval_ms parameter: merge by it, or one response per token",
    )
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    args = parser.parse_args(argv)
    if args.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
