"""A decoupled Triton Python-backend model with the vLLM backend's input/output contract.

Inputs: ``text_input`` (STRING), ``stream`` (BOOL), ``sampling_parameters`` (STRING, JSON),
``exclude_input_in_output`` (BOOL), ``return_finish_reason``, ``return_num_input_tokens``,
``return_num_output_tokens`` (BOOL). Outputs: ``text_output`` (STRING; the delta when streaming),
``finish_reason`` (STRING; "None" until the last response, as vLLM's backend writes it),
``num_input_tokens`` (UINT32), ``num_output_tokens`` (UINT32, per response).

``execute`` reads each request's inputs and hands it to a worker thread, returning at once, so
Triton keeps accepting requests while tokens stream. Workers only compute: every call into the
stub (sending a response, asking whether a request was cancelled, updating a metric) goes through
one outbox thread, because the stub's shared-memory channel is not safe for concurrent use (Triton
aborted with ``boost::interprocess::lock_exception`` when workers sent at once; Triton's vLLM
backend likewise sends from one thread). The last data response carries
``TRITONSERVER_RESPONSE_COMPLETE_FINAL``.
A cancelled request (client gone, stream cancelled) stops between tokens and ends with a CANCELLED
error. Custom metrics: ``tokenrelay_model_generated_tokens_total`` and
``tokenrelay_model_requests_total{outcome=completed|cancelled|failed|rejected}``.

This module runs inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tokenrelay.triton_python._contract import BadRequest, EngineSampling, parse_sampling
from tokenrelay.triton_python._engine import Engine

__all__ = ["DecoupledLLMModel"]

_OUTCOMES = ("completed", "cancelled", "failed", "rejected")
_SLOT_WAIT_S = 0.02


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


class _Request:
    """One request's parsed inputs, its response sender and what the outbox learnt about it."""

    def __init__(self, request: Any, sender: Any) -> None:
        self.sender = sender
        self.cancelled = False  # written by the outbox thread only
        self.poll_pending = False
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
        self.want_in = _flag(request, "return_num_input_tokens", False)
        self.want_out = _flag(request, "return_num_output_tokens", False)

    def response(self, text: str, finish: str | None, prompt_tokens: int, tokens: int) -> Any:
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))]
        if self.want_finish:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([str(finish)], dtype=object)))
        if self.want_in:
            tensors.append(
                pb_utils.Tensor("num_input_tokens", np.array([prompt_tokens], dtype=np.uint32))
            )
        if self.want_out:
            tensors.append(
                pb_utils.Tensor("num_output_tokens", np.array([tokens], dtype=np.uint32))
            )
        return pb_utils.InferenceResponse(output_tensors=tensors)


class _Outbox:
    """The one thread that talks to the stub on the workers' behalf, in submission order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except Exception as exc:
                pb_utils.Logger.log_error(f"{self._name}: stub call failed: {exc!r}")

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def send(self, req: _Request, response: Any) -> None:
        """Send a response that is not the last; then learn whether ``req`` was cancelled."""

        def job() -> None:
            req.sender.send(response)
            req.cancelled = bool(req.sender.is_cancelled())

        self.submit(job)

    def finish(self, sender: Any, response: Any) -> None:
        """Send the last response of a request."""
        self.submit(
            functools.partial(
                sender.send, response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
        )

    def poll(self, req: _Request) -> bool:
        """What is known of ``req``'s cancellation; asks the stub again unless already asking."""
        if not req.poll_pending:
            req.poll_pending = True

            def job() -> None:
                req.cancelled = bool(req.sender.is_cancelled())
                req.poll_pending = False

            self.submit(job)
        return req.cancelled

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


class DecoupledLLMModel:
    """Triton model shell around an ``Engine``.

    A model's ``model.py`` subclasses it and sets ``engine_factory``, which builds the engine from
    the model config's parameters.
    """

    engine_factory: Callable[[dict[str, str]], Engine]

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model needs a decoupled transaction policy")
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self._name = args["model_name"]
        self._engine = type(self).engine_factory(parameters)
        slots = self._engine.max_concurrency
        self._slots = threading.BoundedSemaphore(slots) if slots else None
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._outbox = _Outbox(self._name)
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
        self._tokens = tokens.Metric(labels={"model": self._name})
        self._outcomes = {
            o: requests.Metric(labels={"model": self._name, "outcome": o}) for o in _OUTCOMES
        }

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = _Request(request, sender)
            except BadRequest as exc:
                self._fail(sender, str(exc), pb_utils.TritonError.INVALID_ARG, "rejected")
                continue
            worker = threading.Thread(target=self._serve, args=(parsed,), daemon=True)
            with self._workers_lock:
                self._workers.add(worker)
            worker.start()
        return None

    def finalize(self) -> None:
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout=30)
        self._outbox.close()
        self._engine.close()

    def _serve(self, req: _Request) -> None:
        try:
            self._generate(req)
        except Exception as exc:  # a model bug must end the request, never hang it
            message = f"{self._name}: generation failed: {exc!r}"
            self._outbox.submit(lambda: pb_utils.Logger.log_error(message))
            self._fail(req.sender, "generation failed", pb_utils.TritonError.INTERNAL, "failed")
        finally:
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def _count(self, outcome: str) -> None:
        self._outbox.submit(functools.partial(self._outcomes[outcome].increment, 1))

    def _fail(self, sender: Any, message: str, code: Any, outcome: str) -> None:
        self._count(outcome)
        error = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        self._outbox.finish(sender, error)

    def _acquire_slot(self, req: _Request) -> bool:
        if self._slots is None:
            return True
        while not self._slots.acquire(timeout=_SLOT_WAIT_S):
            if self._outbox.poll(req):
                return False
        return True

    def _generate(self, req: _Request) -> None:
        try:
            prompt_tokens = self._engine.count_prompt_tokens(req.prompt)
        except BadRequest as exc:
            self._fail(req.sender, str(exc), pb_utils.TritonError.INVALID_ARG, "rejected")
            return
        if not self._acquire_slot(req):
            self._fail(req.sender, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
            return
        try:
            self._run(req, prompt_tokens)
        except BadRequest as exc:
            self._fail(req.sender, str(exc), pb_utils.TritonError.INVALID_ARG, "rejected")
        finally:
            if self._slots is not None:
                self._slots.release()

    def _run(self, req: _Request, prompt_tokens: int) -> None:
        held_text = req.prompt if req.prepend_input else ""
        held_tokens = 0
        for step in self._engine.stream(req.prompt, req.sampling, lambda: self._outbox.poll(req)):
            self._outbox.submit(functools.partial(self._tokens.increment, step.tokens))
            held_tokens += step.tokens
            held_text += step.text
            if step.finish_reason is None and (not req.stream or not held_text):
                continue
            if step.finish_reason is not None:
                self._count("completed")
                response = req.response(held_text, step.finish_reason, prompt_tokens, held_tokens)
                self._outbox.finish(req.sender, response)
                return
            self._outbox.send(req, req.response(held_text, None, prompt_tokens, held_tokens))
            held_text, held_tokens = "", 0
        # The engine stopped without a finish reason: the request was cancelled.
        self._fail(req.sender, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
