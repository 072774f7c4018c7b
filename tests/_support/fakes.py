"""In-memory stand-ins at the seams, for unit and in-process tests of one module: a token
source, an embedding source, a clock and a routing rng."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from tokenrelay.errors import UpstreamUnavailable
from tokenrelay.generation import Delta, FinishReason, Logprob, Sampling, TokenLogprob


class FakeSource:
    """An in-memory ``TokenSource`` for unit and in-process tests.

    Streams ``words`` one per ``interval_s``; records each generation's prompt and whether it was
    closed early (cancelled). ``fail_with`` raises instead of streaming; ``first_delay_s`` delays
    the first token. With ``sampling.top_logprobs`` set each word comes with a log probability
    of -(its position + 1), and that many alternatives (``alt0`` …, less likely than it).
    """

    def __init__(
        self,
        name: str = "fake:1",
        words: tuple[str, ...] = ("Hello", " world", "!"),
        interval_s: float = 0.0,
        first_delay_s: float = 0.0,
        ready: bool = True,
        fail_with: BaseException | None = None,
    ) -> None:
        self._name = name
        self.words = words
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self.is_ready = ready
        self.fail_with = fail_with
        self.prompts: list[str] = []
        self.samplings: list[Sampling] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0
        self.finished = 0
        self.closed = False
        self.ended = asyncio.Event()  # set when a generation ends, whichever way

    @property
    def name(self) -> str:
        return self._name

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        self.headers.append(dict(headers))
        self.prompts.append(prompt)
        self.samplings.append(sampling)
        done = False
        try:
            await asyncio.sleep(self.first_delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            limit = sampling.max_tokens or len(self.words)
            words = self.words[:limit]
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(self.interval_s)
                last = i == len(words) - 1
                reason = None
                if last:
                    reason = FinishReason.LENGTH if limit < len(self.words) else FinishReason.STOP
                logprobs: tuple[TokenLogprob, ...] = ()
                if sampling.top_logprobs is not None:
                    top = [Logprob(word, -(i + 1.0))] + [
                        Logprob(f"alt{k}", -(i + 2.0 + k)) for k in range(sampling.top_logprobs)
                    ]
                    logprobs = (
                        TokenLogprob(word, -(i + 1.0), tuple(top[: sampling.top_logprobs])),
                    )
                yield Delta(word, 1, len(prompt.split()), reason, logprobs)
            done = True
        finally:
            if done:
                self.finished += 1
            else:
                self.cancelled += 1
            self.ended.set()

    async def ready(self, model: str) -> bool:
        return self.is_ready

    async def close(self) -> None:
        self.closed = True


class ContinuingSource(FakeSource):
    """A ``FakeSource`` that continues its own answer as greedy decoding would: a prompt that
    ends with the first k of ``words`` gets the words after them (at most ``max_tokens``).
    ``fail_after`` / ``hang_after``: after that many words of one generation, raise
    ``unavailable()`` / go silent (until cancelled); either applies to the next generation
    only (a node that broke once)."""

    def __init__(
        self,
        name: str,
        words: tuple[str, ...] = tuple(f" w{i}" for i in range(12)),
        fail_after: int | None = None,
        hang_after: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, words, **kwargs)
        self.fail_after = fail_after
        self.hang_after = hang_after

    def _given(self, prompt: str) -> int:
        for k in range(len(self.words), 0, -1):
            if prompt.endswith("".join(self.words[:k])):
                return k
        return 0

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        self.headers.append(dict(headers))
        self.prompts.append(prompt)
        self.samplings.append(sampling)
        fail_after, self.fail_after = self.fail_after, None
        hang_after, self.hang_after = self.hang_after, None
        given = self._given(prompt)
        rest = self.words[given:]
        limit = sampling.max_tokens or len(rest)
        words = rest[:limit]
        done = False
        try:
            await asyncio.sleep(self.first_delay_s)
            for i, word in enumerate(words):
                if i == fail_after:
                    raise unavailable()
                if i == hang_after:
                    await asyncio.Event().wait()
                if i:
                    await asyncio.sleep(self.interval_s)
                reason = None
                if i == len(words) - 1:
                    reason = FinishReason.LENGTH if limit < len(rest) else FinishReason.STOP
                yield Delta(word, 1, len(prompt.split()), reason)
            done = True
        finally:
            if done:
                self.finished += 1
            else:
                self.cancelled += 1
            self.ended.set()


WORDS = ("zorblatt", "quenvik", "veltrax", "toaster", "marmot", "banana")


class FakeEmbedder:
    """Bag-of-known-words vectors: texts sharing words are similar, others orthogonal."""

    name = "fake-embedder"

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def embed(
        self, model: str, texts: Sequence[str], request_id: str, timeout_s: float
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        self.calls.append(len(texts))
        vectors = np.zeros((len(texts), 8), np.float32)
        for i, text in enumerate(texts):
            for j, word in enumerate(WORDS):
                vectors[i, j] = text.lower().count(word)
            vectors[i, 7] = 0.01
            vectors[i] /= np.linalg.norm(vectors[i])
        return vectors, np.array([len(t.split()) for t in texts], np.uint32)


def unavailable() -> UpstreamUnavailable:
    """The error a node that cannot be reached raises."""
    return UpstreamUnavailable("The inference node is unavailable.")


T = TypeVar("T")


class Clock:
    """A fake monotonic clock: tests move ``now`` by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ordered(random.Random):
    """An rng that always takes the first candidates, so routing ties go to the first node."""

    def choice(self, seq: Sequence[T]) -> T:
        return seq[0]

    def sample(self, population: Sequence[T], k: int, **_: Any) -> list[T]:  # type: ignore[override]
        return list(population[:k])


class RecordingLedger:
    """Takes the rows a ``UsageLedger`` would write (key, model, outcome, prompt, completion)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int, int]] = []

    def record(self, key_id: str, model: str, outcome: str, prompt: int, completion: int) -> None:
        self.rows.append((key_id, model, outcome, prompt, completion))
