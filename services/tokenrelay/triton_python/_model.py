"""A decoupled Triton Python-backend model with the vLLM backend's input/output contract.

Inputs: ``text_input`` (STRING), ``stream`` (BOOL), ``sampling_parameters`` (STRING, JSON),
``exclude_input_in_output`` (BOOL), ``return_finish_reason``, ``return_cumulative_logprob``,
``return_logprobs``, ``return_num_input_tokens``, ``return_num_output_tokens`` (BOOL). Outputs:
``text_output`` (STRING; the delta when streaming), ``finish_reason`` (STRING; "None" until the
last response, as vLLM's backend writes it), ``cumulative_logprob`` (FP32: the sum of the sampled
tokens' logprobs so far; NaN unless ``sampling_parameters`` asks for ``logprobs``, as vLLM sends
None), ``logprobs`` (STRING: JSON of a list, one entry per new token of the response, each
``{"<token id>": {"logprob", "rank", "decoded_token"}, ...}`` with the sampled token first;
``null`` unless ``logprobs`` was asked for), ``num_input_tokens`` (UINT32), ``num_output_tokens``
(UINT32, per response).

``execute`` reads each request's inputs and submits it to the engine, returning at once, so
Triton keeps accepting requests while tokens stream. The engine reports each request's steps from
its own thread (the batched llama.cpp engine: one thread for every running request; a streaming
engine such as the synthetic one: a worker thread per request). Those threads only compute: every
call into the stub (building and sending a response, asking whether a request was cancelled,
updating a metric) goes through one outbox thread, because the stub's shared-memory channel is not
safe for concurrent use (Triton aborted with ``boost::interprocess::lock_exception`` when workers
sent at once; Triton's vLLM backend likewise sends from one thread). The last data response
carries ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``. A streaming request's ``stream_interval_ms``
request parameter (``_contract.STREAM_INTERVAL_PARAMETER``, sent by the orchestrator when it
relays at a stream interval) is honoured as tokenrelay's vLLM model honours it: the first text goes
out at once, later text waits until that long after the previous response and goes out together.
A cancelled request (client gone, stream cancelled) stops between steps and ends with a CANCELLED
error. Custom metrics: ``tokenrelay_model_generated_tokens_total`` and
``tokenrelay_model_requests_total{outcome=completed|cancelled|failed|rejected}``.

This module runs inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tokenrelay.triton_python._contract import (
    BadRequest,
    EngineSampling,
    parse_sampling,
    parse_stream_interval,
)
from tokenrelay.triton_python._engine import (
    Engine,
    Step,
    StreamingEngine,
    TokenLogprob,
    as_engine,
    refuse_unsupported,
)

__all__ = ["DecoupledLLMModel"]

_OUTCOMES = ("completed", "cancelled", "failed", "rejected")


def _due() -> None:
    """The outbox's wake-up for a timed job (never run)."""


def _input(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _flag(request: Any, name: str, default: bool) -> bool:
    value = _input(request, name)
    return default if value is None else bool(value)


def _text(request: Any, name: str) -> str | None:
    value = _input(request, name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not valid UTF-8") from None
    return str(value)


def _logprobs_json(entries: list[tuple[TokenLogprob, ...]]) -> bytes:
    """The ``logprobs`` output as ``request.py``'s ``create_response`` writes it."""
    return json.dumps(
        [
            {
                str(c.token_id): {
                    "logprob": c.logprob,
                    "rank": c.rank,
                    "decoded_token": c.decoded_token,
                }
                for c in entry
            }
            for entry in entries
        ]
    ).encode("utf-8")


class _Outbox:
    """The one thread that talks to the stub on the engines' behalf, in submission order, and
    runs the jobs it was asked to run later (``later``) when their time comes."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # (when, order, job): the outbox thread's own (``later`` is called from its jobs only).
        self._timed: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def _call(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:
            pb_utils.Logger.log_error(f"{self._name}: stub call failed: {exc!r}")

    def _run(self) -> None:
        while True:
            wait = max(0.0, self._timed[0][0] - time.monotonic()) if self._timed else None
            try:
                job = self._queue.get(timeout=wait)
            except queue.Empty:
                job = _due
            if job is None:
                return
            if job is not _due:
                self._call(job)
            now = time.monotonic()
            while self._timed and self._timed[0][0] <= now:
                self._call(heapq.heappop(self._timed)[2])

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def later(self, when: float, job: Callable[[], None]) -> None:
        """(Outbox thread.) Run ``job`` at ``time.monotonic()`` ``when``."""
        heapq.heappush(self._timed, (when, next(self._order), job))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


class _Request:
    """One request: its parsed inputs, and the ``StepSink`` its engine reports to.

    The engine's thread calls ``emit``/``fail``/``stopped``/``cancelled``; they only gather text
    and queue work for the outbox, which builds and sends the responses and asks the stub about
    cancellation.
    """

    def __init__(self, request: Any, model: DecoupledLLMModel) -> None:
        self.sender = request.get_response_sender()
        self._model = model
        self._outbox = model.outbox
        self._cancelled = False  # written by the outbox thread only
        self._poll_pending = False
        self.prompt_tokens = 0
        self._held_text = ""
        self._held_tokens = 0
        self._held_logprobs: list[tuple[TokenLogprob, ...]] = []
        self._cumulative = 0.0
        # The stream interval's merging, the outbox thread's own: what waits, when the last
        # response went out, whether text has gone out, and whether the request has ended.
        self.interval = 0.0
        self._waiting: tuple[str, int, list[tuple[TokenLogprob, ...]], float] | None = None
        self._last_sent = 0.0
        self._text_sent = False
        self._flush_due = False
        self._ended = False

    def parse(self, request: Any) -> None:
        """Read the inputs; raises ``BadRequest`` with a clear message."""
        prompt = _text(request, "text_input")
        if prompt is None:
            raise BadRequest("text_input is required")
        self.prompt = prompt
        self.stream = _flag(request, "stream", False)
        if not _flag(request, "exclude_input_in_output", self.stream) and self.stream:
            raise BadRequest("When streaming, `exclude_input_in_output` = False is not allowed.")
        self.prepend_input = not _flag(request, "exclude_input_in_output", self.stream)
        self.sampling: EngineSampling = parse_sampling(_text(request, "sampling_parameters"))
        self.want_finish = _flag(request, "return_finish_reason", False)
        self.want_cumulative = _flag(request, "return_cumulative_logprob", False)
        self.want_logprobs = _flag(request, "return_logprobs", False)
        self.want_in = _flag(request, "return_num_input_tokens", False)
        self.want_out = _flag(request, "return_num_output_tokens", False)
        self._held_text = prompt if self.prepend_input else ""
        if self.stream:
            self.interval = parse_stream_interval(request.parameters())

    def _response(
        self,
        text: str,
        finish: str | None,
        tokens: int,
        logprobs: list[tuple[TokenLogprob, ...]],
        cumulative: float,
    ) -> Any:
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))]
        if self.want_finish:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([str(finish)], dtype=object)))
        asked = self.sampling.logprobs is not None
        if self.want_cumulative:
            value = cumulative if asked else float("nan")
            tensors.append(
                pb_utils.Tensor("cumulative_logprob", np.array([value], dtype=np.float32))
            )
        if self.want_logprobs:
            tensors.append(
                pb_utils.Tensor(
                    "logprobs",
                    np.array([_logprobs_json(logprobs) if asked else b"null"], dtype=object),
                )
            )
        if self.want_in:
            tensors.append(
                pb_utils.Tensor("num_input_tokens", np.array([self.prompt_tokens], dtype=np.uint32))
            )
        if self.want_out:
            tensors.append(
                pb_utils.Tensor("num_output_tokens", np.array([tokens], dtype=np.uint32))
            )
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # StepSink, called by the engine's thread.

    def cancelled(self) -> bool:
        """What is known of the cancellation; asks the stub again unless already asking."""
        if not self._poll_pending:
            self._poll_pending = True

            def job() -> None:
                self._cancelled = bool(self.sender.is_cancelled())
                self._poll_pending = False

            self._outbox.submit(job)
        return self._cancelled

    def emit(self, step: Step) -> None:
        self._outbox.submit(functools.partial(self._model.count_tokens, step.tokens))
        self._held_tokens += step.tokens
        self._held_text += step.text
        if step.logprobs:
            self._held_logprobs.extend(step.logprobs)
            self._cumulative += sum(entry[0].logprob for entry in step.logprobs)
        if step.finish_reason is None and (not self.stream or not self._held_text):
            return
        text, tokens, logprobs = self._held_text, self._held_tokens, self._held_logprobs
        self._held_text, self._held_tokens, self._held_logprobs = "", 0, []
        if step.finish_reason is not None:
            self._model.count_outcome("completed")
        self._outbox.submit(
            functools.partial(
                self._deliver, text, tokens, logprobs, self._cumulative, step.finish_reason
            )
        )

    # The outbox thread's: `_deliver`, `_flush`, `_end`.

    def _deliver(
        self,
        text: str,
        tokens: int,
        logprobs: list[tuple[TokenLogprob, ...]],
        cumulative: float,
        finish: str | None,
    ) -> None:
        """Send a response now, or (after the first text, within the stream interval of the
        last response) keep it to go out with what follows."""
        if self._ended:
            return
        if self._waiting is not None:
            text, tokens, logprobs = (
                self._waiting[0] + text,
                self._waiting[1] + tokens,
                self._waiting[2] + logprobs,
            )
            self._waiting = None
        if finish is not None:
            self._ended = True
            response = self._response(text, finish, tokens, logprobs, cumulative)
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        due = self._last_sent + self.interval
        if self._text_sent and time.monotonic() < due:
            self._waiting = (text, tokens, logprobs, cumulative)
            if not self._flush_due:
                self._flush_due = True
                self._outbox.later(due, self._flush)
            return
        self._last_sent = time.monotonic()
        self._text_sent = self._text_sent or bool(self.interval and text)
        self.sender.send(self._response(text, None, tokens, logprobs, cumulative))
        self._cancelled = bool(self.sender.is_cancelled())

    def _flush(self) -> None:
        """The stream interval passed: what waits goes out."""
        self._flush_due = False
        if self._waiting is not None and not self._ended:
            text, tokens, logprobs, cumulative = self._waiting
            self._waiting = None
            self._deliver(text, tokens, logprobs, cumulative, None)

    def _end(self) -> None:
        self._ended = True

    def fail(self, error: Exception) -> None:
        self._outbox.submit(self._end)  # nothing waiting goes out after the error
        if isinstance(error, BadRequest):
            self._model.finish_with_error(
                self.sender, str(error), pb_utils.TritonError.INVALID_ARG, "rejected"
            )
            return
        message = f"{self._model.name}: generation failed: {error!r}"
        self._outbox.submit(lambda: pb_utils.Logger.log_error(message))
        self._model.finish_with_error(
            self.sender, "generation failed", pb_utils.TritonError.INTERNAL, "failed"
        )

    def stopped(self) -> None:
        self._outbox.submit(self._end)  # nothing waiting goes out after the error
        self._model.finish_with_error(
            self.sender, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled"
        )


class DecoupledLLMModel:
    """Triton model shell around an engine.

    A model's ``model.py`` subclasses it and sets ``engine_factory``, which builds the engine from
    the model config's parameters: an ``Engine``, or a ``StreamingEngine`` that the shell runs
    with a worker thread per request.
    """

    engine_factory: Callable[[dict[str, str]], Engine | StreamingEngine]

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model needs a decoupled transaction policy")
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = args["model_name"]
        self._engine = as_engine(type(self).engine_factory(parameters))
        self.outbox = _Outbox(self.name)
        tokens = pb_utils.MetricFamily(
            name="tokenrelay_model_generated_tokens_total",
            description="Tokens generated by the model, cancelled requests included",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        requests = pb_utils.MetricFamily(
            name="tokenrelay_model_requests_total",
            description="Requests finished by the model, by outcome",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # A family must outlive its metrics: keep both.
        self._families = (tokens, requests)
        self._tokens = tokens.Metric(labels={"model": self.name})
        self._outcomes = {
            o: requests.Metric(labels={"model": self.name, "outcome": o}) for o in _OUTCOMES
        }

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            req = _Request(request, self)
            try:
                req.parse(request)
                refuse_unsupported(req.sampling, self._engine.features)
                req.prompt_tokens = self._engine.count_prompt_tokens(req.prompt)
                self._engine.submit(req.prompt, req.sampling, req)
            except BadRequest as exc:
                self.finish_with_error(
                    req.sender, str(exc), pb_utils.TritonError.INVALID_ARG, "rejected"
                )
            except Exception as exc:  # a model bug must end the request, never hang it
                req.fail(exc)
        return None

    def finalize(self) -> None:
        self._engine.close()  # running requests end (stopped) through the outbox
        self.outbox.close()

    def count_tokens(self, tokens: int) -> None:
        """(Outbox thread.) Add to the generated-tokens counter."""
        self._tokens.increment(tokens)

    def count_outcome(self, outcome: str) -> None:
        self.outbox.submit(functools.partial(self._outcomes[outcome].increment, 1))

    def finish_with_error(self, sender: Any, message: str, code: Any, outcome: str) -> None:
        """End a request with an error response (built and sent by the outbox)."""
        self.count_outcome(outcome)

        def job() -> None:
            error = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
            sender.send(error, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        self.outbox.submit(job)
