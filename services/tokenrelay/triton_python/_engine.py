"""The seam between the Triton model shell and what actually produces tokens.

An ``Engine`` takes requests with ``submit`` and reports each one's progress to the request's
``StepSink`` from a thread of its own (the batched llama.cpp engine decodes every running request
in one step). A ``StreamingEngine`` is the simpler kind, one generator per request (the synthetic
model); ``ThreadedEngine`` runs such an engine as an ``Engine``, a worker thread per request.
Nothing here imports Triton, so engines are testable on their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokenrelay.triton_python._contract import BadRequest, EngineSampling

__all__ = [
    "Engine",
    "Step",
    "StepSink",
    "StreamingEngine",
    "ThreadedEngine",
    "TokenLogprob",
    "as_engine",
    "refuse_unsupported",
]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One candidate of one position: its log-probability, its rank (1 = most likely) and text."""

    token_id: int
    logprob: float
    rank: int
    decoded_token: str


@dataclass(frozen=True, slots=True)
class Step:
    """One step of generation: ``text`` produced by ``tokens`` new tokens.

    ``finish_reason`` ("stop", "length") is set on the last step only; text may be empty while
    tokens are held back (a possible start of a stop sequence, an unfinished UTF-8 character).
    ``logprobs`` has one entry per token when the request asked for logprobs: the sampled token
    first, then the most likely ones (as vLLM returns them), else it is empty.
    """

    text: str
    tokens: int
    finish_reason: str | None = None
    logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()


class StepSink(Protocol):
    """Where an engine reports one request. Every call comes from the engine's own thread(s).

    A request ends with exactly one of: a step that has a ``finish_reason``, ``fail`` or
    ``stopped``; nothing is called after that. None of these may block: the engine's thread
    decodes every other running request too.
    """

    def cancelled(self) -> bool:
        """Whether the client gave up (polled between steps; answers from what is known)."""
        ...

    def emit(self, step: Step) -> None: ...

    def fail(self, error: Exception) -> None:
        """The request ended with ``error`` (``BadRequest``: the request's fault)."""
        ...

    def stopped(self) -> None:
        """The request ended early: ``cancelled()`` said so, or the engine is closing."""
        ...


@runtime_checkable
class Engine(Protocol):
    """Generates tokens for many requests at once.

    ``features`` names the optional sampling features it implements (``structured_outputs``,
    ``logprobs``, ``logit_bias``); the shell refuses a request that needs another one.
    ``submit`` returns at once; it raises ``BadRequest`` for a request it cannot serve (a
    prompt longer than the context window, a grammar that does not compile), before the request
    joins any other. Later the request is reported to ``sink``.
    """

    features: frozenset[str]

    def count_prompt_tokens(self, prompt: str) -> int: ...

    def submit(self, prompt: str, sampling: EngineSampling, sink: StepSink) -> None: ...

    def close(self) -> None:
        """Stop: running and waiting requests end with ``stopped``. Safe to call twice."""
        ...


class StreamingEngine(Protocol):
    """Generates tokens for one request per ``stream`` call.

    ``max_concurrency`` is how many ``stream`` calls may run at once (None: unlimited). ``stream``
    checks ``cancelled()`` between tokens and returns early when it becomes true. Raises
    ``BadRequest`` for a request it cannot serve (e.g. a prompt longer than the context window).
    It may name its optional ``features`` as an ``Engine`` does; without that attribute it has
    none.
    """

    max_concurrency: int | None

    def count_prompt_tokens(self, prompt: str) -> int: ...

    def stream(
        self, prompt: str, sampling: EngineSampling, cancelled: Callable[[], bool]
    ) -> Iterator[Step]: ...

    def close(self) -> None: ...


_SLOT_WAIT_S = 0.02


class ThreadedEngine:
    """A ``StreamingEngine`` as an ``Engine``: a worker thread per request.

    With ``max_concurrency`` set, workers wait for a slot (and leave the wait at once when their
    request is cancelled).
    """

    def __init__(self, inner: StreamingEngine) -> None:
        self._inner = inner
        self.features: frozenset[str] = frozenset(getattr(inner, "features", ()))
        slots = inner.max_concurrency
        self._slots = threading.BoundedSemaphore(slots) if slots else None
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def count_prompt_tokens(self, prompt: str) -> int:
        return self._inner.count_prompt_tokens(prompt)

    def submit(self, prompt: str, sampling: EngineSampling, sink: StepSink) -> None:
        worker = threading.Thread(target=self._serve, args=(prompt, sampling, sink), daemon=True)
        with self._lock:
            self._workers.add(worker)
        worker.start()

    def _acquire(self, sink: StepSink) -> bool:
        if self._slots is None:
            return True
        while not self._slots.acquire(timeout=_SLOT_WAIT_S):
            if sink.cancelled():
                return False
        return True

    def _serve(self, prompt: str, sampling: EngineSampling, sink: StepSink) -> None:
        try:
            if not self._acquire(sink):
                sink.stopped()
                return
            try:
                for step in self._inner.stream(prompt, sampling, sink.cancelled):
                    sink.emit(step)
                    if step.finish_reason is not None:
                        return
                sink.stopped()  # the engine returned without finishing: cancelled
            except Exception as exc:  # BadRequest or a bug: the request ends, never hangs
                sink.fail(exc)
            finally:
                if self._slots is not None:
                    self._slots.release()
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers)
        self._inner.close()
        for worker in workers:
            worker.join(timeout=30)


def as_engine(engine: Engine | StreamingEngine) -> Engine:
    """``engine`` itself when it takes requests with ``submit``, else a ``ThreadedEngine``."""
    if isinstance(engine, Engine):
        return engine
    return ThreadedEngine(engine)


def refuse_unsupported(sampling: EngineSampling, features: frozenset[str]) -> None:
    """Raise ``BadRequest`` when ``sampling`` needs a feature that is not in ``features``."""
    for name in sampling.features():
        if name not in features:
            raise BadRequest(f"sampling parameter '{name}' is not supported by this model")
