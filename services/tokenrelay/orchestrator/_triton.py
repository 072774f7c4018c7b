"""One Triton node as a ``TokenSource``, over gRPC with the service's own generated stubs.

Each generation is one ``ModelStreamInfer`` stream carrying one request, so cancelling the stream
cancels exactly that Triton request (Triton then tells the model, which stops decoding). The
vLLM backend's contract is spoken as it is: ``exclude_input_in_output`` is always true, token
counts and the finish reason are asked for; log probabilities only when the request wants them
(``return_logprobs`` → the ``logprobs`` output, JSON text per response).

Generation streams go over tokenrelay's own HTTP/2 client (``_h2``, ``triton_streams = "h2"``,
the default, for a ``host:port`` address): through ``grpc.aio`` a message read and decoded cost
~55 µs of the orchestrator's CPU, about as much as everything else it does per relayed token;
through ``_h2`` ~20 (``benchmarks/h2_read.py``). ``triton_streams = "grpc"`` (or an address
that is a gRPC target, ``dns:///…``) reads them through ``grpc.aio``, as every other call
(readiness, embeddings) is made. Either way the messages are ``tritonclient``'s generated ones
(``service_pb2``), not ``tritonclient.grpc.aio``'s client: that one wraps every response in an
``InferResult`` (and a request iterator in a task of its own). A response's raw output contents
are decoded here (``_decode``). The bidirectional ``ModelStreamInfer`` is called as a
server-streaming call (one request, then the half-close), which sends the request in one batch.

A stream fails three ways, all translated here: a ``grpc.RpcError`` (``_h2`` raises gRPC's own
``AioRpcError``) when the call is set up or while reading, a response whose ``error_message`` is
set (a backend that ignores ``triton_grpc_error``), and a stream that ends before the last
response. Messages of the upstream
never reach callers; they go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2

from tokenrelay.config import Timeouts
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Delta, FinishReason, Logprob, Sampling, TokenLogprob
from tokenrelay.orchestrator._h2 import H2Channel, tls_context
from tokenrelay.triton_python._contract import STREAM_INTERVAL_PARAMETER

__all__ = ["TritonNode", "TritonTLS"]

log = logging.getLogger(__name__)

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
    "cancelled": FinishReason.CANCELLED,
}
_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
_OUTPUTS_WITH_LOGPROBS = (*_OUTPUTS, "logprobs")
_LENGTH = struct.Struct("<I")
_NUMBERS = {
    "UINT32": struct.Struct("<I"),
    "INT32": struct.Struct("<i"),
    "UINT64": struct.Struct("<Q"),
    "INT64": struct.Struct("<q"),
}
# Last-resort phrases, for a backend that sends no status code with its error (Triton's vLLM
# backend reports every failure as INTERNAL): a prompt that does not fit (ours and vLLM's words),
# and a request the model refused as malformed (vLLM's SamplingParams checks). The orchestrator
# validates first, so these mean the two layers disagree; the request still gets a 400 and the
# node is not blamed (a client must not be able to open a node's breaker with requests the
# model refuses). Phrases never take a node out of rotation: only status codes do.
_CONTEXT_PHRASES = ("context window", "maximum context length")
_REFUSAL_PHRASES = (
    "sampling parameter",
    "sampling_parameters",
    "out of range",
    "must be",
    "not supported",
    "is required",
    "not valid",
)
# Asks Triton (24.08+) to end a stream whose request failed with the failure's gRPC status code,
# instead of an error message with no code inside the stream.
_STREAM_ERRORS = ("triton_grpc_error", "true")


_Tensor = service_pb2.ModelInferRequest.InferInputTensor
_SERVICE = "/inference.GRPCInferenceService/"


def _bool_input(name: str, value: bool) -> tuple[Any, bytes]:
    """A BOOL [1] input and its raw contents (one byte)."""
    return _Tensor(name=name, datatype="BOOL", shape=[1]), b"\x01" if value else b"\x00"


def _bytes_input(name: str, value: str) -> tuple[Any, bytes]:
    """A BYTES [1] input and its raw contents (a 4-byte length, then UTF-8)."""
    data = value.encode("utf-8")
    return _Tensor(name=name, datatype="BYTES", shape=[1]), _LENGTH.pack(len(data)) + data


def _infer_request(
    model: str, request_id: str, inputs: Sequence[tuple[Any, bytes]], outputs: Sequence[str]
) -> Any:
    return service_pb2.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[tensor for tensor, _ in inputs],
        raw_input_contents=[raw for _, raw in inputs],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )


def _classify(code: grpc.StatusCode | None, message: str, address: str) -> RelayError:
    """A failure Triton reported, by its status code first (``None``: it sent none)."""
    log.warning(
        "triton call failed",
        extra={"fields": {"node": address, "grpc_code": str(code), "upstream_error": message}},
    )
    lowered = message.lower()
    if code in (None, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
        if any(phrase in lowered for phrase in _CONTEXT_PHRASES):
            return InvalidRequest(
                "The prompt and max_tokens do not fit in the model's context window.",
                param="messages",
                code="context_length_exceeded",
            )
        if code is grpc.StatusCode.INVALID_ARGUMENT or any(
            phrase in lowered for phrase in _REFUSAL_PHRASES
        ):
            return InvalidRequest("The model refused the request's parameters.")
        return GenerationFailed("The model failed while generating.")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimeout("The inference node did not answer in time.")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
        # The model is not in the repository or not ready, or the node cannot be reached.
        return UpstreamUnavailable("The model is not available on the inference node.")
    if code is grpc.StatusCode.CANCELLED:
        return UpstreamUnavailable("The inference node cancelled the request.")
    return GenerationFailed("The inference node failed the request.")


def _rpc_error(exc: grpc.RpcError, address: str) -> RelayError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else ""
    return _classify(code, str(details or ""), address)


@contextmanager
def _translate(address: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise _rpc_error(exc, address) from exc


@dataclass(frozen=True, slots=True)
class TritonTLS:
    """PEM file paths: the CA of Triton's certificate (TLS on when set), and the orchestrator's
    own certificate and key for Triton's mutual TLS."""

    ca: str = ""
    cert: str = ""
    key: str = ""


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class TritonNode:
    """A Triton server reached over gRPC; implements ``tokenrelay.generation.TokenSource``."""

    def __init__(
        self,
        address: str,
        timeouts: Timeouts,
        reconnect_max_s: float = 1.0,
        tls: TritonTLS | None = None,
        streams: str = "h2",
    ) -> None:
        """``reconnect_max_s`` caps gRPC's reconnect backoff (default 120 s), so that a node
        that comes back is reachable by the next probe instead of minutes later. ``tls``: TLS
        to Triton's gRPC endpoint when it names a CA. ``streams``: the client of generation
        streams, ``h2`` (``_h2``: a ``host:port`` address only; others go through gRPC) or
        ``grpc`` (``grpc.aio``)."""
        self._address = address
        self._timeouts = timeouts
        backoff_ms = max(100, int(reconnect_max_s * 1000))
        tls = tls or TritonTLS()
        options = [
            # No cap on message sizes (as tritonclient sets them: embeddings can be large).
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
            # Triton answers client pings more often than every 5 min with GOAWAY.
            ("grpc.keepalive_time_ms", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
            ("grpc.min_reconnect_backoff_ms", min(backoff_ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        if tls.ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca),
                private_key=_read(tls.key),
                certificate_chain=_read(tls.cert),
            )
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        channel = self._channel
        self._h2 = (
            H2Channel(
                address,
                timeouts.connect_s,
                tls_context(tls.ca, tls.cert, tls.key) if tls.ca else None,
            )
            if streams == "h2" and H2Channel.parses(address)
            else None
        )
        # ModelStreamInfer is a bidirectional method, but one generation is one request and
        # then the client's half-close: on the wire exactly what a server-streaming call sends.
        # Called as one, gRPC sends the metadata, the request and the half-close in one batch
        # (one completion to wait for) instead of three awaited steps.
        self._stream_infer = channel.unary_stream(
            _SERVICE + "ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self._infer = channel.unary_unary(
            _SERVICE + "ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        self._server_ready = channel.unary_unary(
            _SERVICE + "ServerReady",
            request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=service_pb2.ServerReadyResponse.FromString,
        )
        self._model_ready = channel.unary_unary(
            _SERVICE + "ModelReady",
            request_serializer=service_pb2.ModelReadyRequest.SerializeToString,
            response_deserializer=service_pb2.ModelReadyResponse.FromString,
        )

    @property
    def name(self) -> str:
        return self._address

    async def ready(self, model: str) -> bool:
        try:
            async with asyncio.timeout(self._timeouts.connect_s):
                server = await self._server_ready(service_pb2.ServerReadyRequest())
                if not server.ready:
                    return False
                answer = await self._model_ready(service_pb2.ModelReadyRequest(name=model))
                return bool(answer.ready)
        except (grpc.RpcError, TimeoutError):
            return False

    def _request(self, model: str, prompt: str, sampling: Sampling, request_id: str) -> Any:
        inputs = [
            _bytes_input("text_input", prompt),
            _bool_input("stream", True),
            _bytes_input("sampling_parameters", json.dumps(sampling.to_engine_json())),
            _bool_input("exclude_input_in_output", True),
            _bool_input("return_finish_reason", True),
            _bool_input("return_num_input_tokens", True),
            _bool_input("return_num_output_tokens", True),
        ]
        outputs: Sequence[str] = _OUTPUTS
        if sampling.top_logprobs is not None:  # a model may not declare these: only when asked
            inputs.append(_bool_input("return_logprobs", True))
            outputs = _OUTPUTS_WITH_LOGPROBS
        request = _infer_request(model, request_id, inputs, outputs)
        if sampling.stream_interval_ms:
            # A hint the model may take (merging this stream's responses) or ignore.
            request.parameters[STREAM_INTERVAL_PARAMETER].int64_param = sampling.stream_interval_ms
        return request

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        request = self._request(model, prompt, sampling, request_id)
        metadata = (*headers, _STREAM_ERRORS)
        if self._h2 is None:
            async for delta in self._generate_grpc(request, sampling, metadata):
                yield delta
            return
        # One request, then the half-close; Triton keeps streaming responses.
        with _translate(self._address):
            stream = await self._h2.stream(
                _SERVICE + "ModelStreamInfer", request.SerializeToString(), metadata
            )
        final = False
        parse = service_pb2.ModelStreamInferResponse.FromString
        try:
            while True:
                raw = await stream.read()
                if raw is None:
                    raise UpstreamUnavailable("The inference node closed the stream early.")
                delta, final = self._delta(parse(raw), sampling)
                yield delta
                if final:
                    return
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self._address) from exc
        finally:
            if final:
                stream.let_end(_END_S)  # as _let_end: the status comes right after
            else:
                # Cancels the Triton request when we stop early (caller gone, watchdog, error).
                stream.cancel()

    def _delta(self, message: Any, sampling: Sampling) -> tuple[Delta, bool]:
        """One ``ModelStreamInferResponse`` of either client as a ``Delta`` and whether it is
        the last; an error inside it (a backend that ignores ``triton_grpc_error``) raised."""
        if message.error_message:
            raise _classify(None, message.error_message, self._address)
        return _decode(message.infer_response, sampling.top_logprobs)

    async def _generate_grpc(
        self, request: Any, sampling: Sampling, metadata: Sequence[tuple[str, str]]
    ) -> AsyncGenerator[Delta, None]:
        """``generate`` through ``grpc.aio`` (``triton_streams = "grpc"``, or an address that
        is a gRPC target rather than ``host:port``)."""
        call = self._stream_infer(request, metadata=metadata)
        final = False
        try:
            while True:
                with _translate(self._address):
                    message: Any = await call.read()
                if message is grpc.aio.EOF:
                    raise UpstreamUnavailable("The inference node closed the stream early.")
                delta, final = self._delta(message, sampling)
                yield delta
                if final:
                    return
        finally:
            if final:
                _let_end(call)
            else:
                # Cancels the Triton request when we stop early (caller gone, watchdog, error).
                call.cancel()

    async def embed(
        self, model: str, texts: Sequence[str], request_id: str, timeout_s: float
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """One request to an embedding model (``triton_models/minilm``'s contract): input
        ``text`` [n] → ``embedding`` [n, d], ``num_tokens`` [n]."""
        encoded = [t.encode("utf-8") for t in texts]
        raw = b"".join(_LENGTH.pack(len(e)) + e for e in encoded)
        tensor = _Tensor(name="text", datatype="BYTES", shape=[len(texts)])
        request = _infer_request(model, request_id, [(tensor, raw)], ("embedding", "num_tokens"))
        try:
            with _translate(self._address):
                response = await self._infer(request, timeout=timeout_s)
        except GenerationFailed as exc:
            raise GenerationFailed("The embedding model failed.") from exc
        arrays = _arrays(response)
        if "embedding" not in arrays or "num_tokens" not in arrays:
            raise GenerationFailed("The embedding model answered without its outputs.")
        return arrays["embedding"], arrays["num_tokens"]

    async def close(self) -> None:
        if self._h2 is not None:
            await self._h2.close()
        await self._channel.close()


# How long a finished stream's status may take to arrive before the call is cancelled anyway.
_END_S = 1.0
# The calls waiting for their end (a task holds its call: one dropped is cancelled by gRPC).
_ENDING: set[asyncio.Task[None]] = set()


def _let_end(call: Any) -> None:
    """Lets a call whose final response has been read end by itself. Triton ends it right
    after that response (the client half-closed at the start); a cancel that overtook its
    status — ours, or gRPC's own when the call object is dropped — was taken as the
    cancellation of a request it had answered ("CANCELLATION_ISSUED"), which it then waited for
    at stop: its whole exit timeout, then exit code 1. So nothing here waits (the caller may be
    being cancelled itself, as when the edge closes its call after the answer's end): a task
    keeps the call until its status is in, and cancels it only if that takes over ``_END_S``."""
    if call.done():
        return
    try:
        task = asyncio.get_running_loop().create_task(_ended(call))
    except RuntimeError:  # no running loop (interpreter shutdown): nothing left to wait with
        call.cancel()
        return
    _ENDING.add(task)
    task.add_done_callback(_ENDING.discard)


async def _ended(call: Any) -> None:
    try:
        async with asyncio.timeout(_END_S):
            await call.code()
    except TimeoutError:
        call.cancel()
    except grpc.RpcError:
        pass


_DTYPES = {
    "FP32": "<f4",
    "FP16": "<f2",
    "FP64": "<f8",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT32": "<u4",
    "UINT64": "<u8",
}


def _arrays(response: Any) -> dict[str, npt.NDArray[Any]]:
    """A response's numeric outputs as arrays of their shape (raw little-endian contents)."""
    arrays = {}
    raws = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        if index < len(raws) and output.datatype in _DTYPES:
            array = np.frombuffer(raws[index], dtype=_DTYPES[output.datatype])
            arrays[output.name] = array.reshape(tuple(output.shape))
    return arrays


def _first_raw(datatype: str, raw: bytes) -> Any:
    """The first element of a raw output tensor (Triton's little-endian wire layout): a BYTES
    element is a 4-byte length and its bytes; numbers are fixed-size."""
    if datatype == "BYTES":
        if len(raw) < 4:
            return None
        (length,) = _LENGTH.unpack_from(raw)
        return raw[4 : 4 + length]
    if datatype in _NUMBERS and len(raw) >= _NUMBERS[datatype].size:
        return _NUMBERS[datatype].unpack_from(raw)[0]
    return None


def _logprobs(raw: bytes, top: int) -> tuple[TokenLogprob, ...]:
    """The ``logprobs`` output of one response: JSON text of a list, one entry per new token, of
    ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` with the sampled token first and the
    ``top`` most likely (rank 1 …) among the rest (vLLM's ``create_response``). Anything
    malformed raises ``GenerationFailed``."""
    try:
        entries = json.loads(raw)
        if entries is None:
            return ()
        out = []
        for entry in entries:
            candidates = [
                (str(c.get("decoded_token") or ""), float(c["logprob"]), int(c.get("rank") or 0))
                for c in entry.values()
            ]
            token, logprob, _ = candidates[0]
            ranked = sorted((c for c in candidates if c[2] > 0), key=lambda c: c[2])
            out.append(
                TokenLogprob(token, logprob, tuple(Logprob(t, lp) for t, lp, _ in ranked[:top]))
            )
        return tuple(out)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        raise GenerationFailed("The model sent malformed log probabilities.") from None


def _decode(response: Any, top_logprobs: int | None = None) -> tuple[Delta, bool]:
    """One response of the stream (a ``ModelInferResponse``) as a ``Delta``, and whether it is
    the last.

    Reads the response's raw output contents directly: through tritonclient's
    ``InferResult.as_numpy`` every token cost four numpy arrays.
    """
    values: dict[str, Any] = {}
    raws = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        if index < len(raws):
            values[output.name] = _first_raw(output.datatype, raws[index])
    text = values.get("text_output")
    finish = values.get("finish_reason")
    prompt_tokens = values.get("num_input_tokens")
    output_tokens = values.get("num_output_tokens")
    finish_text = finish.decode() if isinstance(finish, bytes) else "None"
    final = bool(response.parameters["triton_final_response"].bool_param)
    reason = _FINISH.get(finish_text.lower())
    if final and reason is None:
        reason = FinishReason.STOP
    logprobs = values.get("logprobs")
    delta = Delta(
        text=text.decode("utf-8", errors="replace") if isinstance(text, bytes) else "",
        output_tokens=int(output_tokens or 0),
        prompt_tokens=None if prompt_tokens is None else int(prompt_tokens),
        finish_reason=reason,
        logprobs=(
            _logprobs(logprobs, top_logprobs)
            if top_logprobs is not None and isinstance(logprobs, bytes)
            else ()
        ),
    )
    return delta, final or reason is not None
