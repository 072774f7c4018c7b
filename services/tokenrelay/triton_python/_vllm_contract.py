"""Triton's vLLM-backend contract for tokenrelay's own vLLM model, in plain Python.

No Triton and no vLLM imports, so that it is unit-testable on a machine without either. The
model (``vllm_engine``) reads a request's inputs into a ``VllmRequest`` while Triton's
``execute`` runs, turns its ``sampling`` into ``vllm.SamplingParams`` and streams
``Piece``\\ s, which ``Pending`` merges when several arrive before the model can send them.

What the sampling parameters accept is what Triton's vLLM backend accepts
(``TritonSamplingParams.from_dict`` in triton-inference-server/vllm_backend ``src/utils``): a
JSON object of ``SamplingParams`` fields, numbers written as strings converted to the field's
type, and ``structured_outputs`` as a JSON object *written as a string*. The differences, each a
clear refusal where the backend would fail later or silently: unknown fields, ``lora_name`` (no
adapters here), ``output_kind`` (the model streams deltas itself) and ``n`` other than 1; and
``logit_bias``'s keys are read as token ids (the backend hands JSON's string keys to vLLM, whose
engine then fails the request), checked as the CPU models check them.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenrelay.triton_python._contract import BadRequest, parse_stream_interval
from tokenrelay.triton_python._contract import _logit_bias as logit_bias_pairs

__all__ = [
    "CONTEXT_PHRASES",
    "Pending",
    "Piece",
    "VllmRequest",
    "context_error",
    "parse_vllm_sampling",
]

# vLLM's words for a prompt that does not fit (renderers/params.py, v1/engine/input_processor.py).
CONTEXT_PHRASES = ("maximum context length", "maximum model length")
# Fields the model sets itself or that this deployment does not offer.
_REFUSED = {
    "output_kind": "the model streams deltas itself",
    "lora_name": "no LoRA adapters are configured",
    "detokenize": "the model always returns text",
}
_SCALARS = (bool, int, float, str)


def _scalar_type(annotation: Any) -> type | None:
    """``int`` for ``int`` and ``int | None`` (also written as strings, as postponed
    annotations are); None for anything that is not one scalar."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        if text.startswith("Optional[") and text.endswith("]"):
            text = text[len("Optional[") : -1]
        names = [n for n in text.split("|") if n != "None"]
        by_name = {t.__name__: t for t in _SCALARS}
        return by_name.get(names[0]) if len(names) == 1 else None
    if annotation in _SCALARS:
        return typing.cast(type, annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return typing.cast(type, args[0])
    return None


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Numbers and booleans written as strings, as the vLLM backend's examples send them."""
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false"):
                raise ValueError(value)
            return lowered == "true"
        return kind(value)
    except ValueError:
        raise BadRequest(
            f"sampling parameter '{name}' must be {kind.__name__}, got {value!r}"
        ) from None


def parse_vllm_sampling(text: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``SamplingParams`` from the ``sampling_parameters`` JSON text.

    ``fields`` maps ``SamplingParams``'s field names to their annotations. ``structured_outputs``
    comes back as a dict (the caller builds ``StructuredOutputsParams`` from it). Raises
    ``BadRequest`` with a message naming the parameter.
    """
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"sampling_parameters is not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise BadRequest("sampling_parameters must be a JSON object")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _REFUSED:
            raise BadRequest(f"sampling parameter '{name}' is not supported: {_REFUSED[name]}")
        if name == "structured_outputs":
            if not isinstance(value, str):
                raise BadRequest(
                    "sampling parameter 'structured_outputs' must be a JSON object written as "
                    "a string, as Triton's vLLM backend takes it"
                )
            try:
                constraint = json.loads(value)
            except json.JSONDecodeError as exc:
                raise BadRequest(
                    f"sampling parameter 'structured_outputs' is not valid JSON: {exc.msg}"
                ) from None
            if not isinstance(constraint, dict):
                raise BadRequest("sampling parameter 'structured_outputs' must be a JSON object")
            out[name] = constraint
            continue
        if name not in fields or name.startswith("_"):
            raise BadRequest(f"unknown sampling parameter '{name}'")
        if name == "logit_bias":
            # JSON's keys are strings; SamplingParams takes token ids (vLLM's OpenAI server
            # converts them too), and an engine handed strings fails the request.
            out[name] = dict(logit_bias_pairs(value)) or None
            continue
        kind = _scalar_type(fields[name])
        out[name] = value if kind is None else _coerce(name, value, kind)
    if out.get("n", 1) not in (1, None):
        raise BadRequest(
            "sampling parameter 'n' is not supported by this model other than 1 "
            "(the orchestrator fans out n generations)"
        )
    return out


def context_error(message: str) -> str | None:
    """A caller-safe message when vLLM refused a prompt for its length; None otherwise."""
    lowered = message.lower()
    if any(phrase in lowered for phrase in CONTEXT_PHRASES):
        return f"the prompt does not fit in the model's context window: {message}"
    return None


@dataclass(frozen=True, slots=True)
class VllmRequest:
    """One request's inputs, read while ``execute`` runs (Triton 2.51 frees them after)."""

    prompt: str
    stream: bool
    prepend_input: bool
    sampling: dict[str, Any]
    want_finish: bool = False
    want_cumulative_logprob: bool = False
    want_logprobs: bool = False
    want_in: bool = False
    want_out: bool = False
    stream_interval_s: float = 0.0

    @classmethod
    def from_inputs(
        cls,
        text: Mapping[str, str | None],
        flags: Mapping[str, bool | None],
        fields: Mapping[str, Any],
        parameters: str | None = None,
    ) -> VllmRequest:
        """``text``: the STRING inputs by name (None: absent); ``flags``: the BOOL inputs;
        ``parameters``: the request parameters as Triton gives them (JSON text), of which only
        the stream interval (``STREAM_INTERVAL_PARAMETER``) is read."""
        prompt = text.get("text_input")
        if prompt is None:
            raise BadRequest("text_input is required")
        if text.get("image") is not None:
            raise BadRequest("this model takes no images")
        if text.get("embedding_request") is not None:
            raise BadRequest("this model does not serve embedding requests")
        stream = bool(flags.get("stream") or False)
        exclude = flags.get("exclude_input_in_output")
        # As the vLLM backend: streaming never repeats the prompt; otherwise it does unless
        # exclude_input_in_output says not to.
        prepend = (not exclude) if exclude is not None else not stream
        if prepend and stream:
            raise BadRequest("When streaming, `exclude_input_in_output` = False is not allowed.")
        return cls(
            prompt=prompt,
            stream=stream,
            prepend_input=prepend,
            sampling=parse_vllm_sampling(text.get("sampling_parameters"), fields),
            want_finish=bool(flags.get("return_finish_reason")),
            want_cumulative_logprob=bool(flags.get("return_cumulative_logprob")),
            want_logprobs=bool(flags.get("return_logprobs")),
            want_in=bool(flags.get("return_num_input_tokens")),
            want_out=bool(flags.get("return_num_output_tokens")),
            stream_interval_s=parse_stream_interval(parameters),
        )


@dataclass(frozen=True, slots=True)
class Piece:
    """What one vLLM delta output adds: its text, how many tokens, their logprobs (the vLLM
    backend's JSON shape, one dict per token), the cumulative logprob so far and, on the last,
    the finish reason ("stop", "length", "abort")."""

    text: str
    tokens: int
    prompt_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class Pending:
    """Pieces of one request not yet sent, merged into what one response will carry."""

    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    pieces: int = 0

    def add(self, piece: Piece) -> None:
        self.texts.append(piece.text)
        self.tokens += piece.tokens
        self.prompt_tokens = piece.prompt_tokens
        if piece.logprobs is not None:
            self.logprobs = [*(self.logprobs or ()), *piece.logprobs]
        if piece.cumulative_logprob is not None:
            self.cumulative_logprob = piece.cumulative_logprob
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
        self.pieces += 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def logprobs_json(self) -> str:
        """The ``logprobs`` output: the new tokens' entries, or ``null`` when none were asked."""
        return "null" if self.logprobs is None else json.dumps(self.logprobs)
