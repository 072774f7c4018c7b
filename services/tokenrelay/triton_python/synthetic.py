"""A synthetic model: the vLLM backend contract with no compute, for timing, fault and load tests.

It streams words at a set pace. Model-config parameters (all optional):
  ``default_tokens``        tokens to produce when the request sets no max_tokens (default 64);
                            the answer then ends with finish_reason "stop"
  ``token_interval_ms``     time between tokens (default 20)
  ``first_token_delay_ms``  extra time before the first token (default 0)

With max_tokens set it produces exactly that many tokens and ends with "length". A prompt token
is a whitespace-separated word. The text is fixed by the seed, so a test can compare answers.

A prompt that ends inside the assistant's turn (ChatML's ``<|im_start|>assistant`` with text
after it and no ``<|im_end|>``: what the orchestrator sends to continue an interrupted answer)
is continued as greedy decoding would continue it: when that text is the start of the answer the
seed gives, the stream goes on from where it leaves off (so an answer continued on another node
reads exactly as an uninterrupted one); otherwise a new answer follows it, after a space.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

from tokenrelay.triton_python._contract import EngineSampling, StopMatcher
from tokenrelay.triton_python._engine import Step

__all__ = ["SyntheticEngine", "partial_answer"]

_WORDS = (
    "the quick brown fox jumps over a lazy dog while streams of tokens flow through"
    " every relay and each hop adds almost nothing"
).split()
_ASSISTANT = "<|im_start|>assistant\n"
_END = "<|im_end|>"


def partial_answer(prompt: str) -> str:
    """The assistant's text a ChatML prompt ends with ("" when its last turn is not an open
    assistant turn, or an empty one)."""
    start = prompt.rfind(_ASSISTANT)
    if start < 0:
        return ""
    text = prompt[start + len(_ASSISTANT) :]
    return "" if _END in text else text


def _resume(prompt: str, rng: random.Random) -> str:
    """What goes before the answer's next word: "" for a new answer; " " to continue the
    partial answer ``prompt`` ends with, ``rng`` moved past its words when they are the ones it
    gives (greedy decoding's continuation)."""
    partial = partial_answer(prompt)
    if not partial:
        return ""
    given = ""
    while len(given) < len(partial):
        given += (" " if given else "") + rng.choice(_WORDS)
    return " "


class SyntheticEngine:
    max_concurrency: int | None = None

    def __init__(
        self, default_tokens: int = 64, token_interval_s: float = 0.02, first_delay_s: float = 0.0
    ) -> None:
        self._default_tokens = default_tokens
        self._interval = token_interval_s
        self._first_delay = first_delay_s
        self._closed = threading.Event()

    def count_prompt_tokens(self, prompt: str) -> int:
        return max(1, len(prompt.split()))

    def _pause(self, seconds: float, cancelled: Callable[[], bool]) -> bool:
        """Wait ``seconds``; False when cancelled (or shutting down) meanwhile."""
        end_slices = max(1, int(seconds / 0.01))
        for _ in range(end_slices):
            if cancelled() or self._closed.wait(seconds / end_slices):
                return False
        return not cancelled()

    def stream(
        self, prompt: str, sampling: EngineSampling, cancelled: Callable[[], bool]
    ) -> Iterator[Step]:
        rng = random.Random(sampling.seed)
        lead = _resume(prompt, rng)
        limited = sampling.max_tokens is not None
        count = sampling.max_tokens if sampling.max_tokens is not None else self._default_tokens
        stops = StopMatcher(sampling.stop)
        if not self._pause(self._first_delay, cancelled):
            return
        for i in range(count):
            if i and not self._pause(self._interval, cancelled):
                return
            text, hit = stops.feed((lead if i == 0 else " ") + rng.choice(_WORDS))
            if hit:
                yield Step(text, 1, "stop")
                return
            if i == count - 1:
                yield Step(text + stops.flush(), 1, "length" if limited else "stop")
                return
            yield Step(text, 1)

    def close(self) -> None:
        self._closed.set()

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> SyntheticEngine:
        return cls(
            default_tokens=int(parameters.get("default_tokens", "64")),
            token_interval_s=float(parameters.get("token_interval_ms", "20")) / 1000,
            first_delay_s=float(parameters.get("first_token_delay_ms", "0")) / 1000,
        )
