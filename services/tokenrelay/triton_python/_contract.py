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

__all__ = ["BadRequest", "EngineSampling", "StopMatcher", "parse_sampling"]


class BadRequest(ValueError):
    """The request breaks the contract; the message is sent back to the client as it is."""


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

    def features(self) -> tuple[str, ...]:
        """The optional engine features this request needs (see ``Engine.features``)."""
        return ()


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
_NEUTRAL = {"n": 1, "best_of": 1, "logprobs": None, "prompt_logprobs": None}


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
        elif name in _NEUTRAL:
            if value not in (_NEUTRAL[name], str(_NEUTRAL[name])):
                raise BadRequest(f"sampling parameter '{name}' is not supported by this model")
        else:
            raise BadRequest(f"unknown sampling parameter '{name}'")
    return EngineSampling(**fields)


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
