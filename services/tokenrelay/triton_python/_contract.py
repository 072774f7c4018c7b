"""The vLLM backend's request contract, in plain Python (no Triton imports, unit-testable).

Triton's vLLM backend reads ``sampling_parameters`` as a JSON object of ``vllm.SamplingParams``
fields, accepting numbers written as strings (its own examples send ``{"max_tokens": "100"}``), and
refuses fields it does not know. This module parses the same way for the CPU engines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STREAM_INTERVAL_MS",
    "STREAM_INTERVAL_PARAMETER",
    "BadRequest",
    "EngineSampling",
    "StopMatcher",
    "StructuredOutput",
    "parse_sampling",
    "parse_stream_interval",
]

# vLLM's default max_logprobs: the most candidates per token a request may ask for.
MAX_LOGPROBS = 20


class BadRequest(ValueError):
    """The request breaks the contract; the message is sent back to the client as it is."""


# The request parameter (Triton's ``ModelInferRequest.parameters``, not an input tensor) with
# which the orchestrator tells a model the stream interval it relays at: after the first text,
# the model may hold a stream's tokens until this many milliseconds have passed since its last
# response, and send them together. It is a hint: the text is the same either way (the
# orchestrator merges by the same interval), only the number of responses falls. tokenrelay's
# vLLM model and the CPU models' shell (``_model``) take it; Triton's vLLM backend never reads
# request parameters when the sampling parameters come as an input (as the orchestrator sends
# them), so it ignores it.
STREAM_INTERVAL_PARAMETER = "stream_interval_ms"
MAX_STREAM_INTERVAL_MS = 10_000  # as the orchestrator's own bound (``max_stream_interval_ms``)


def parse_stream_interval(parameters: str | None) -> float:
    """The stream interval in seconds from a request's parameters (Triton's JSON text of them;
    None or no such parameter: 0). Anything but a whole number of milliseconds in
    [0, ``MAX_STREAM_INTERVAL_MS``] is a ``BadRequest``."""
    if not parameters:
        return 0.0
    try:
        decoded = json.loads(parameters)
    except json.JSONDecodeError:
        return 0.0  # not ours to judge: Triton wrote it
    value = decoded.get(STREAM_INTERVAL_PARAMETER) if isinstance(decoded, dict) else None
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"request parameter '{STREAM_INTERVAL_PARAMETER}' must be an integer")
    if not 0 <= value <= MAX_STREAM_INTERVAL_MS:
        raise BadRequest(
            f"request parameter '{STREAM_INTERVAL_PARAMETER}' must be between 0 and"
            f" {MAX_STREAM_INTERVAL_MS}"
        )
    return value / 1000


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """One constraint of vLLM's ``StructuredOutputsParams``: ``json`` (``value``: the JSON schema
    as JSON text), ``json_object`` (any JSON object) or ``choice`` (``choices``: the output is
    exactly one of them)."""

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineSampling:
    max_tokens: int | None = None  # None: the engine's default (vLLM's is 16)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    structured_outputs: StructuredOutput | None = None
    logprobs: int | None = None  # candidates per token besides the sampled one
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])

    def features(self) -> tuple[str, ...]:
        """The optional engine features this request needs (see ``Engine.features``)."""
        needs = (
            ("structured_outputs", self.structured_outputs is not None),
            ("logprobs", self.logprobs is not None),
            ("logit_bias", bool(self.logit_bias)),
        )
        return tuple(name for name, needed in needs if needed)


_FLOATS = {
    "temperature": (0.0, math.inf),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.0, math.inf),
}
# As vLLM's SamplingParams: these must be greater than their lower bound, not equal to it.
_ABOVE_LOW = frozenset({"top_p", "repetition_penalty"})
_INTS = {"max_tokens": (1, 2**31 - 1), "top_k": (-1, 2**31 - 1), "seed": (-(2**63), 2**63 - 1)}
# vLLM fields the CPU engines accept only at their neutral value.
_NEUTRAL = {"n": 1, "best_of": 1, "prompt_logprobs": None}
# StructuredOutputsParams: the constraints (vLLM takes exactly one), and the options the CPU
# engines take only at their default.
_CONSTRAINTS = ("json", "json_object", "choice", "regex", "grammar", "structural_tag")
_OPTIONS: dict[str, tuple[object, ...]] = {
    "disable_any_whitespace": (False,),
    "whitespace_pattern": (),
    # Which backend vLLM falls back to changes nothing here.
    "disable_fallback": (False, True),
    # llama.cpp's JSON-schema grammars never allow properties a schema does not list, so either
    # value gives outputs that satisfy the schema.
    "disable_additional_properties": (False, True),
}
_REFUSED = {
    "regex": "llama.cpp's grammars here are built from JSON schemas; use json or choice",
    "grammar": "vLLM's grammars are EBNF/Lark, llama.cpp's are GBNF; use json or choice",
    "structural_tag": "use json or choice",
}


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise BadRequest(f"sampling parameter '{name}' must be a number, not a boolean")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"sampling parameter '{name}' must be a number, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise BadRequest(f"sampling parameter '{name}' must be finite")
    if kind is int and isinstance(value, float) and value != number:
        raise BadRequest(f"sampling parameter '{name}' must be a whole number")
    return number


def parse_sampling(text: str | None) -> EngineSampling:
    """Parse the ``sampling_parameters`` JSON text; raises ``BadRequest`` with a clear message."""
    if not text:
        return EngineSampling()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"sampling_parameters is not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise BadRequest("sampling_parameters must be a JSON object")
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _FLOATS:
            low, high = _FLOATS[name]
            number = _number(name, value, float)
            if not low <= number <= high or (name in _ABOVE_LOW and number == low):
                raise BadRequest(f"sampling parameter '{name}' is out of range: {number}")
            fields[name] = number
        elif name in _INTS:
            if name == "seed" and value is None:
                continue
            low, high = _INTS[name]
            number = _number(name, value, int)
            if not low <= number <= high:
                raise BadRequest(f"sampling parameter '{name}' is out of range: {number}")
            fields[name] = number
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise BadRequest("sampling parameter 'stop' must be a string or a list of strings")
            fields["stop"] = tuple(stops)
        elif name == "ignore_eos":
            if not isinstance(value, bool):
                raise BadRequest("sampling parameter 'ignore_eos' must be a boolean")
            fields[name] = value
        elif name == "logprobs":
            if value is None:
                continue
            number = _number(name, value, int)
            if not 0 <= number <= MAX_LOGPROBS:
                raise BadRequest(
                    f"sampling parameter 'logprobs' must be between 0 and {MAX_LOGPROBS}"
                )
            fields[name] = number
        elif name == "logit_bias":
            fields[name] = _logit_bias(value)
        elif name == "structured_outputs":
            fields[name] = _structured_outputs(value)
        elif name in _NEUTRAL:
            if value not in (_NEUTRAL[name], str(_NEUTRAL[name])):
                raise BadRequest(f"sampling parameter '{name}' is not supported by this model")
        else:
            raise BadRequest(f"unknown sampling parameter '{name}'")
    return EngineSampling(**fields)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise BadRequest("sampling parameter 'logit_bias' must be an object of token id → bias")
    biases = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0:
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}")
        number = _number(f"logit_bias[{key}]", bias, float)
        if not -100.0 <= number <= 100.0:
            raise BadRequest(f"logit_bias: the bias of token {token} must be in [-100, 100]")
        biases.append((token, number))
    return tuple(biases)


def _structured_outputs(value: Any) -> StructuredOutput | None:
    """Read ``structured_outputs`` as Triton's vLLM backend does: JSON text of the fields of
    ``StructuredOutputsParams``, holding exactly one constraint."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(
            "sampling parameter 'structured_outputs' must be a string holding a JSON object"
        )
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"structured_outputs is not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise BadRequest("structured_outputs must be a JSON object")
    unknown = sorted(set(raw) - set(_CONSTRAINTS) - set(_OPTIONS))
    if unknown:
        raise BadRequest(f"structured_outputs field '{unknown[0]}' is not supported")
    for option, allowed in _OPTIONS.items():
        chosen = raw.get(option)
        if chosen is not None and not any(chosen is a for a in allowed):
            raise BadRequest(
                f"structured_outputs option '{option}' = {json.dumps(chosen)} is not supported"
                " by this model"
            )
    given = [c for c in _CONSTRAINTS if raw.get(c) is not None and raw.get(c) is not False]
    if len(given) != 1:
        raise BadRequest(
            "structured_outputs must hold exactly one of json, json_object, choice"
            + (f" (it holds {', '.join(given)})" if given else "")
        )
    (kind,) = given
    constraint = raw[kind]
    if kind in _REFUSED:
        raise BadRequest(
            f"structured_outputs '{kind}' is not supported by this model: " + _REFUSED[kind]
        )
    if kind == "json_object":
        if constraint is not True:
            raise BadRequest("structured_outputs 'json_object' must be true")
        return StructuredOutput("json_object")
    if kind == "choice":
        if (
            not isinstance(constraint, list)
            or not constraint
            or not all(isinstance(c, str) and c for c in constraint)
        ):
            raise BadRequest("structured_outputs 'choice' must be a list of non-empty strings")
        return StructuredOutput("choice", choices=tuple(constraint))
    schema = constraint
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"structured_outputs 'json' is not valid JSON: {exc.msg}") from None
    if not isinstance(schema, dict):
        raise BadRequest("structured_outputs 'json' must be a JSON schema (an object)")
    return StructuredOutput("json", value=json.dumps(schema))


class StopMatcher:
    """Cuts streamed text at the first stop sequence, holding back what could start one.

    ``feed`` returns the text that is safe to emit and whether a stop sequence was found (the
    stream must end then; the stop sequence itself is never emitted). ``flush`` returns what is
    held back when the stream ends for another reason.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        pending = self._pending + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:size]):
                    hold = size
                    break
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest
