"""The seam between the Triton model shell and what actually produces tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from tokenrelay.triton_python._contract import EngineSampling

__all__ = ["Engine", "Step"]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of generation: ``text`` produced by ``tokens`` new tokens.

    ``finish_reason`` ("stop", "length") is set on the last step only; text may be empty while
    tokens are held back (a possible start of a stop sequence, an unfinished UTF-8 character).
    """

    text: str
    tokens: int
    finish_reason: str | None = None


class Engine(Protocol):
    """Generates tokens for one request at a time per slot.

    ``max_concurrency`` is how many ``stream`` calls may run at once (None: unlimited). ``stream``
    checks ``cancelled()`` between tokens and returns early when it becomes true. Raises
    ``BadRequest`` for a request it cannot serve (e.g. a prompt longer than the context window).
    """

    max_concurrency: int | None

    def count_prompt_tokens(self, prompt: str) -> int: ...

    def stream(
        self, prompt: str, sampling: EngineSampling, cancelled: Callable[[], bool]
    ) -> Iterator[Step]: ...

    def close(self) -> None: ...
