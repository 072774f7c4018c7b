"""One Triton node as a ``TokenSource``, through ``tritonclient.grpc.aio``.

Each generation is one ``ModelStreamInfer`` stream carrying one request, so cancelling the stream
cancels exactly that Triton request (Triton then tells the model, which stops decoding). The
vLLM backend's contract is spoken as it is: ``exclude_input_in_output`` is always true, token
counts and the finish reason are asked for; log probabilities only when the request wants them
(``return_logprobs`` → the ``logprobs`` output, JSON text per response).

``stream_infer`` fails three ways, all translated here by ``_translate``: an exception when the
call is set up, ``(result, error)`` pairs while streaming, and a raw ``grpc.RpcError`` out of
``__anext__``. Messages of the upstream never reach callers; they go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from tokenrelay.config import Timeouts
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Delta, FinishReason, Logprob, Sampling, TokenLogprob

__all__ = ["TritonNode", "TritonTLS"]

log = logging.getLogger(__name__)

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
    "cancelled": FinishReason.CANCELLED,
}
_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
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


def _bool_input(name: str, value: bool) -> InferInput:
    tensor = InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _bytes_input(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=object))
    return tensor


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


def _rpc_error(exc: grpc.RpcError | InferenceServerException, address: str) -> RelayError:
    if isinstance(exc, grpc.RpcError):
        return _classify(exc.code(), str(exc.details() or ""), address)
    status = exc.status() or ""
    code = next((c for c in grpc.StatusCode if str(c) == status), None)
    return _classify(code, str(exc.message() or ""), address)


@contextmanager
def _translate(address: str) -> Iterator[None]:
    try:
        yield
    except (grpc.RpcError, InferenceServerException) as exc:
        raise _rpc_error(exc, address) from exc


@dataclass(frozen=True, slots=True)
class TritonTLS:
    """PEM file paths: the CA of Triton's certificate (TLS on when set), and the orchestrator's
    own certificate and key for Triton's mutual TLS."""

    ca: str = ""
    cert: str = ""
    key: str = ""


class TritonNode:
    """A Triton server reached over gRPC; implements ``tokenrelay.generation.TokenSource``."""

    def __init__(
        self,
        address: str,
        timeouts: Timeouts,
        reconnect_max_s: float = 1.0,
        tls: TritonTLS | None = None,
    ) -> None:
        """``reconnect_max_s`` caps gRPC's reconnect backoff (default 120 s), so that a node
        that comes back is reachable by the next probe instead of minutes later. ``tls``: TLS
        to Triton's gRPC endpoint when it names a CA."""
        self._address = address
        self._timeouts = timeouts
        backoff_ms = max(100, int(reconnect_max_s * 1000))
        tls = tls or TritonTLS()
        self._client = triton_aio.InferenceServerClient(
            url=address,
            ssl=bool(tls.ca),
            root_certificates=tls.ca or None,
            private_key=tls.key or None,
            certificate_chain=tls.cert or None,
            channel_args=[
                # tritonclient's defaults, which passing channel_args replaces:
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
                # Triton answers client pings more often than every 5 min with GOAWAY.
                ("grpc.keepalive_time_ms", 2**31 - 1),
                ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
                ("grpc.min_reconnect_backoff_ms", min(backoff_ms, 1000)),
                ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ],
        )
        self._outputs = [InferRequestedOutput(name) for name in _OUTPUTS]
        self._outputs_with_logprobs = [*self._outputs, InferRequestedOutput("logprobs")]
        self._embed_outputs = [
            InferRequestedOutput("embedding"),
            InferRequestedOutput("num_tokens"),
        ]

    @property
    def name(self) -> str:
        return self._address

    async def ready(self, model: str) -> bool:
        try:
            async with asyncio.timeout(self._timeouts.connect_s):
                return bool(
                    await self._client.is_server_ready()
                    and await self._client.is_model_ready(model)
                )
        except (grpc.RpcError, InferenceServerException, TimeoutError):
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
        outputs = self._outputs
        if sampling.top_logprobs is not None:  # a model may not declare these: only when asked
            inputs.append(_bool_input("return_logprobs", True))
            outputs = self._outputs_with_logprobs
        return {"model_name": model, "request_id": request_id, "outputs": outputs, "inputs": inputs}

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        request = self._request(model, prompt, sampling, request_id)

        async def requests() -> AsyncIterator[Any]:
            # One request, then the client half-closes; Triton keeps streaming its responses.
            yield request

        with _translate(self._address):
            stream = self._client.stream_infer(requests(), headers=dict((*headers, _STREAM_ERRORS)))
        try:
            while True:
                with _translate(self._address):
                    try:
                        result, error = await anext(stream)
                    except StopAsyncIteration:
                        raise UpstreamUnavailable(
                            "The inference node closed the stream early."
                        ) from None
                if error is not None:  # a backend that ignores triton_grpc_error
                    raise _rpc_error(error, self._address)
                delta, final = _decode(result, sampling.top_logprobs)
                yield delta
                if final:
                    return
        finally:
            # Cancels the Triton request when we stop early (caller gone, watchdog, error);
            # a no-op once the stream has ended.
            stream.cancel()

    async def embed(
        self, model: str, texts: Sequence[str], request_id: str, timeout_s: float
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """One request to an embedding model (``triton_models/minilm``'s contract): input
        ``text`` [n] → ``embedding`` [n, d], ``num_tokens`` [n]."""
        tensor = InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=object))
        try:
            with _translate(self._address):
                result = await self._client.infer(
                    model,
                    [tensor],
                    outputs=self._embed_outputs,
                    request_id=request_id,
                    client_timeout=timeout_s,
                )
        except GenerationFailed as exc:
            raise GenerationFailed("The embedding model failed.") from exc
        return result.as_numpy("embedding"), result.as_numpy("num_tokens")

    async def close(self) -> None:
        await self._client.close()


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


def _decode(result: Any, top_logprobs: int | None = None) -> tuple[Delta, bool]:
    """One response of the stream as a ``Delta``, and whether it is the last.

    Reads the response's raw output contents directly: through ``InferResult.as_numpy`` every
    token cost four numpy arrays, the largest share of the orchestrator's CPU per token.
    """
    response = result.get_response()
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
