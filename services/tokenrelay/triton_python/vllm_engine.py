"""tokenrelay's Triton Python model that drives vLLM's ``AsyncLLM``, behind exactly the
contract of Triton's vLLM backend (``_vllm_contract``), built to lose fewer tokens on the way.

Why not only NVIDIA's backend: it sends one response per vLLM output and asks the stub
``is_cancelled()`` after each (two stub round trips per token), observes a histogram per token
for ``vllm:time_per_output_token_seconds`` (a third round trip per token, on a thread of its
own), and asks vLLM for cumulative outputs, with which vLLM's ``stream_interval`` has no effect
(vLLM's output processor only advances its sent-token offset for delta outputs). Here:

- vLLM streams **delta** outputs, so the engine's ``stream_interval`` (model.json) takes effect;
- one **sender thread** owns every call into the stub (the stub's channel is not safe for
  concurrent use). It takes whatever the engine produced since its last round, **merges the
  deltas of each request into one response**, and sends. When it keeps up, each token goes out
  alone; when it falls behind, responses carry several tokens, so its work per token falls as
  the load grows. Nothing is held back until a request's first text has gone out (a first
  output with no text yet, which vLLM's detokenizer can produce, does not count); after that,
  a response waits at least the stream's interval after the previous one (time-based merging):
  the larger of the model-config parameter ``response_interval_ms`` and the request's
  ``stream_interval_ms`` parameter, which the orchestrator sends when it relays at a stream
  interval (``_contract.STREAM_INTERVAL_PARAMETER``), so that its stream interval also cuts the
  responses it reads. A new request does not wake the sender
  thread (it is picked up on its next round, at the latest after ``cancel_poll_ms`` / 2), so
  that the thread does not compete for the GIL with the loop thread that submits the request;
- cancellation is **polled** at most every ``cancel_poll_ms`` per request (default 100) instead
  of after every response; a cancelled request's task is cancelled, which makes vLLM abort it;
- metrics are **aggregated** in the process and flushed every ``metrics_interval_ms``
  (default 1000): ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``,
  ``vllm:request_prompt_tokens``, ``vllm:request_generation_tokens``,
  ``vllm:request_time_per_output_token_seconds``, ``vllm:num_requests_running`` and
  ``vllm:num_requests_waiting``, plus the CPU models' ``tokenrelay_model_generated_tokens_total``
  and ``tokenrelay_model_requests_total{outcome}``. Per-token histograms are left out: each
  observation is a stub round trip.

Engine arguments come from ``<version>/model.json`` as for the vLLM backend. Model-config
parameters: ``REPORT_CUSTOM_METRICS`` (default "true"), ``ENABLE_VLLM_HEALTH_CHECK`` (a dead
engine unloads the model and requests get UNAVAILABLE), ``response_interval_ms``,
``cancel_poll_ms``, ``metrics_interval_ms``, and ``trace_path``: when set, one JSON line per
streaming request is appended to that file when its first text has been sent, with the
request's Triton id and ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process of
the host) at ``execute`` (``execute``), on the engine's loop (``loop``), when vLLM's first
output with text arrived (``output``), when the sender thread began that response (``build``)
and when its ``send`` returned (``sent``):
where the first token waits inside the model (``benchmarks/gpu/suite.py ttft`` joins it with
the client's own times).

This module runs inside Triton's Python-backend stub, where ``triton_python_backend_utils`` and
vLLM exist; both are imported when the model initializes, not at import.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tokenrelay.triton_python._contract import BadRequest
from tokenrelay.triton_python._vllm_contract import (
    Pending,
    Piece,
    VllmRequest,
    context_error,
)

__all__ = ["ModelSettings", "TritonPythonModel"]

_OUTCOMES = ("completed", "cancelled", "failed", "rejected")
_STRING_INPUTS = ("text_input", "sampling_parameters", "image", "embedding_request")
_BOOL_INPUTS = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0]
_E2E_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0]


def _tokens_buckets(limit: int) -> list[float]:
    buckets: list[float] = []
    step = 1
    while step <= limit:
        buckets.extend(float(m * step) for m in (1, 2, 5) if m * step <= limit)
        step *= 10
    return buckets


class ModelSettings:
    """The model-config parameters this model reads (strings, as Triton gives them)."""

    __slots__ = (
        "cancel_poll_s",
        "health_check",
        "metrics",
        "metrics_interval_s",
        "response_interval_s",
        "trace_path",
    )

    def __init__(self, parameters: dict[str, str]) -> None:
        def flag(name: str, default: bool) -> bool:
            return parameters.get(name, str(default)).strip().lower() == "true"

        def seconds(name: str, default_ms: float) -> float:
            value = float(parameters.get(name, str(default_ms)))
            if value < 0:
                raise ValueError(f"model parameter {name} must not be negative")
            return value / 1000

        self.metrics = flag("REPORT_CUSTOM_METRICS", True)
        self.health_check = flag("ENABLE_VLLM_HEALTH_CHECK", False)
        self.response_interval_s = seconds("response_interval_ms", 0)
        self.cancel_poll_s = seconds("cancel_poll_ms", 100)
        self.metrics_interval_s = seconds("metrics_interval_ms", 1000)
        self.trace_path = parameters.get("trace_path", "").strip()


class _Stream:
    """One request: its inputs, its response sender and what the sender thread knows of it."""

    __slots__ = (
        "cancel_sent",
        "cancelled",
        "done",
        "id",
        "interval",
        "last_poll",
        "last_sent",
        "outcome",
        "req",
        "sender",
        "task",
        "text_sent",
        "total",
        "trace",
    )

    def __init__(
        self,
        req: VllmRequest,
        sender: Any,
        now: float,
        trace: dict[str, Any] | None = None,
        interval: float = 0.0,
    ) -> None:
        self.req = req
        self.interval = max(interval, req.stream_interval_s)  # merging's, after the first text
        self.sender = sender
        self.id = uuid.uuid4().hex
        self.task: asyncio.Task[None] | None = None  # the loop thread's only
        # The timing trace (``trace_path``): written by the stub's thread, then the loop's,
        # then the sender's, each after the one before has handed the stream on.
        self.trace = trace
        self.cancelled = False  # the sender thread's only, from here down
        self.cancel_sent = False
        self.done = False
        self.text_sent = False  # a response with text has gone out: merging may hold later ones
        self.last_poll = now
        self.last_sent = 0.0
        self.outcome = "completed"
        self.total = Pending()  # everything, for a request that does not stream


_STOP = object()
_WAKE = object()


class _Sender:
    """The thread that makes every stub call: responses, cancellation polls, metrics."""

    def __init__(self, model: TritonPythonModel, settings: ModelSettings) -> None:
        self._model = model
        self._settings = settings
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # New requests, handed over without waking the thread (deque appends are atomic).
        self._new: collections.deque[_Stream] = collections.deque()
        self._active: dict[str, _Stream] = {}
        self._held: dict[str, tuple[_Stream, Pending]] = {}
        self._thread = threading.Thread(target=self._run, name="tokenrelay-sender", daemon=True)
        self._trace: TextIO | None = None
        if settings.trace_path:
            self._trace = open(settings.trace_path, "a", buffering=1)  # noqa: SIM115
        self.responses = 0

    def start(self) -> None:
        self._thread.start()

    def register(self, stream: _Stream) -> None:
        """A new request (the stub's thread, before the request reaches the loop): taken at
        the thread's next round, which its first piece or the poll timeout starts."""
        self._new.append(stream)

    def piece(self, stream: _Stream, piece: Piece) -> None:
        self._queue.put(("piece", stream, piece))

    def fail(self, stream: _Stream, message: str, code: str, outcome: str) -> None:
        self._queue.put(("error", stream, message, code, outcome))

    def reject(self, sender: Any, message: str) -> None:
        self._queue.put(("reject", sender, message))

    def call(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the sender thread (a stub call of someone else's)."""
        self._queue.put(("call", job))

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
        if self._trace is not None:
            self._trace.close()

    # The sender thread's own, from here down.

    def _timeout(self) -> float | None:
        waits = []
        if self._held:
            now = time.monotonic()
            waits.append(min(s.last_sent + s.interval for s, _ in self._held.values()) - now)
        # Always: a request registered while the thread sleeps is taken within this.
        waits.append(self._settings.cancel_poll_s / 2 or 0.05)
        if self._model.metrics is not None:
            waits.append(self._settings.metrics_interval_s)
        return max(0.0, min(waits)) if waits else None

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._timeout())
            except queue.Empty:
                item = _WAKE
            items = [item]
            while len(items) < 4096:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            while self._new:
                stream = self._new.popleft()
                self._active[stream.id] = stream
            stopping = False
            for it in items:
                if it is _STOP:
                    stopping = True
                elif it is not _WAKE:
                    self._take(it)
            now = time.monotonic()
            self._flush_held(now)
            self._poll(now)
            metrics = self._model.metrics
            if metrics is not None:
                self._guard(functools.partial(metrics.flush, now, force=stopping))
            if stopping:
                return

    def _guard(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # a stub call that fails must not end the thread
            self._model.log_error(f"stub call failed: {exc!r}")

    def _take(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "piece":
            stream: _Stream = item[1]
            piece: Piece = item[2]
            if stream.done:
                return
            if not stream.req.stream:
                stream.total.add(piece)
                if piece.finish_reason is not None:
                    self._finish(stream, stream.total)
                return
            held = self._held.get(stream.id)
            if held is None:
                held = self._held[stream.id] = (stream, Pending())
            held[1].add(piece)
        elif kind == "error":
            stream, message, code, outcome = item[1:]
            if not stream.done:
                self._held.pop(stream.id, None)
                stream.outcome = outcome
                self._error(stream.sender, message, code)
                self._end(stream)
        elif kind == "reject":
            self._model.count("rejected")
            self._error(item[1], item[2], "INVALID_ARG")
        elif kind == "call":
            self._guard(item[1])

    def _flush_held(self, now: float) -> None:
        for key, (stream, pending) in list(self._held.items()):
            if pending.finished:
                del self._held[key]
                self._finish(stream, pending)
            elif not stream.text_sent or now - stream.last_sent >= stream.interval:
                del self._held[key]
                self._send(stream, pending, final=False, now=now)

    def _send(self, stream: _Stream, pending: Pending, final: bool, now: float) -> None:
        began = time.monotonic() if stream.trace is not None else 0.0
        response = self._model.response(stream.req, pending)
        flags = self._model.final_flag if final else 0
        self._guard(lambda: stream.sender.send(response, flags=flags))
        self.responses += 1
        if not stream.text_sent and any(pending.texts):
            stream.text_sent = True
            if stream.trace is not None and self._trace is not None:
                stream.trace["build"] = began
                stream.trace["sent"] = time.monotonic()
                self._guard(lambda: self._write_trace(stream.trace))
        stream.last_sent = now

    def _write_trace(self, trace: dict[str, Any] | None) -> None:
        assert self._trace is not None
        self._trace.write(json.dumps(trace) + "\n")

    def _finish(self, stream: _Stream, pending: Pending) -> None:
        if stream.req.prepend_input:
            pending.texts.insert(0, stream.req.prompt)
        self._send(stream, pending, final=True, now=time.monotonic())
        self._model.count("completed")
        self._end(stream)

    def _error(self, sender: Any, message: str, code: str) -> None:
        response = self._model.error_response(message, code)
        self._guard(lambda: sender.send(response, flags=self._model.final_flag))

    def _end(self, stream: _Stream) -> None:
        stream.done = True
        self._active.pop(stream.id, None)
        if stream.outcome != "completed":
            self._model.count(stream.outcome)

    def _poll(self, now: float) -> None:
        every = self._settings.cancel_poll_s
        for stream in list(self._active.values()):
            if stream.cancel_sent or now - stream.last_poll < every:
                continue
            stream.last_poll = now
            try:
                cancelled = bool(stream.sender.is_cancelled())
            except Exception as exc:
                self._model.log_error(f"is_cancelled failed: {exc!r}")
                continue
            if cancelled:
                stream.cancel_sent = True
                self._model.cancel(stream)


class _Metrics:
    """vLLM's statistics and the model's own counts, gathered in the process and written to
    Triton's metrics every ``interval_s`` from the sender thread (each write is a stub call)."""

    def __init__(self, pb_utils: Any, labels: dict[str, str], max_model_len: int) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._observed: dict[str, list[float]] = {}
        self._gauges: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self._interval_s = 1.0
        kinds = pb_utils.MetricFamily
        families = {
            "vllm:prompt_tokens_total": ("Number of prefill tokens processed.", kinds.COUNTER),
            "vllm:generation_tokens_total": (
                "Number of generation tokens processed.",
                kinds.COUNTER,
            ),
            "vllm:num_requests_running": ("Requests in the engine's running batch.", kinds.GAUGE),
            "vllm:num_requests_waiting": ("Requests waiting to be scheduled.", kinds.GAUGE),
            "vllm:time_to_first_token_seconds": (
                "Histogram of time to first token in seconds.",
                kinds.HISTOGRAM,
            ),
            "vllm:e2e_request_latency_seconds": (
                "Histogram of end to end request latency in seconds.",
                kinds.HISTOGRAM,
            ),
            "vllm:request_prompt_tokens": ("Prompt tokens per request.", kinds.HISTOGRAM),
            "vllm:request_generation_tokens": ("Generated tokens per request.", kinds.HISTOGRAM),
            "vllm:request_time_per_output_token_seconds": (
                "Histogram of each request's mean time per output token in seconds.",
                kinds.HISTOGRAM,
            ),
            "tokenrelay_model_generated_tokens_total": (
                "Tokens generated by the model, cancelled requests included",
                kinds.COUNTER,
            ),
            "tokenrelay_model_requests_total": (
                "Requests finished by the model, by outcome",
                kinds.COUNTER,
            ),
        }
        buckets = {
            "vllm:time_to_first_token_seconds": _TTFT_BUCKETS,
            "vllm:e2e_request_latency_seconds": _E2E_BUCKETS,
            "vllm:request_prompt_tokens": _tokens_buckets(max_model_len),
            "vllm:request_generation_tokens": _tokens_buckets(max_model_len),
            "vllm:request_time_per_output_token_seconds": _TPOT_BUCKETS,
        }
        # A family must outlive its metrics: keep them all.
        self._families = {
            name: kinds(name=name, description=text, kind=kind)
            for name, (text, kind) in families.items()
        }
        self._metrics: dict[str, Any] = {}
        for name, family in self._families.items():
            if name == "tokenrelay_model_requests_total":
                for outcome in _OUTCOMES:
                    self._metrics[f"{name}:{outcome}"] = family.Metric(
                        labels={"model": labels["model"], "outcome": outcome}
                    )
            elif name.startswith("tokenrelay_"):
                self._metrics[name] = family.Metric(labels={"model": labels["model"]})
            elif name in buckets:
                self._metrics[name] = family.Metric(labels=labels, buckets=buckets[name])
            else:
                self._metrics[name] = family.Metric(labels=labels)

    def set_interval(self, seconds: float) -> None:
        self._interval_s = seconds

    def count(self, name: str, value: float) -> None:
        if value:
            with self._lock:
                self._counts[name] = self._counts.get(name, 0.0) + value

    def observe(self, name: str, values: list[float]) -> None:
        if values:
            with self._lock:
                self._observed.setdefault(name, []).extend(values)

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """What vLLM's stat loggers get after each engine step (on the engine's loop)."""
        if scheduler_stats is not None:
            self.gauge("vllm:num_requests_running", scheduler_stats.num_running_reqs)
            self.gauge("vllm:num_requests_waiting", scheduler_stats.num_waiting_reqs)
        if iteration_stats is None:
            return
        self.count("vllm:prompt_tokens_total", iteration_stats.num_prompt_tokens)
        self.count("vllm:generation_tokens_total", iteration_stats.num_generation_tokens)
        self.observe("vllm:time_to_first_token_seconds", iteration_stats.time_to_first_tokens_iter)
        finished = iteration_stats.finished_requests
        if finished:
            self.observe("vllm:e2e_request_latency_seconds", [r.e2e_latency for r in finished])
            self.observe("vllm:request_prompt_tokens", [r.num_prompt_tokens for r in finished])
            self.observe(
                "vllm:request_generation_tokens", [r.num_generation_tokens for r in finished]
            )
            self.observe(
                "vllm:request_time_per_output_token_seconds",
                [r.mean_time_per_output_token for r in finished if r.num_generation_tokens > 1],
            )

    def flush(self, now: float, force: bool = False) -> None:
        """Write what was gathered (sender thread only)."""
        if not force and now - self._last_flush < self._interval_s:
            return
        self._last_flush = now
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
            gauges, self._gauges = self._gauges, {}
        for name, value in counts.items():
            self._metrics[name].increment(value)
        for name, values in observed.items():
            metric = self._metrics[name]
            for value in values:
                metric.observe(value)
        for name, value in gauges.items():
            self._metrics[name].set(value)


def _stat_logger_factory(metrics: _Metrics) -> Any:
    """A vLLM ``StatLoggerFactory`` whose loggers feed ``metrics`` (vLLM imported here)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            metrics.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger


def _logprobs(output: Any) -> list[dict[str, Any]] | None:
    """vLLM's per-token logprobs in the vLLM backend's JSON shape."""
    if output.logprobs is None:
        return None
    return [
        {
            str(token): {
                "logprob": entry.logprob,
                "rank": entry.rank,
                "decoded_token": entry.decoded_token,
            }
            for token, entry in position.items()
        }
        for position in output.logprobs
    ]


class TritonPythonModel:
    """The Triton model. ``initialize`` starts vLLM on a loop thread of its own and the sender
    thread; ``execute`` reads each request's inputs, hands it to the loop and returns at once."""

    metrics: _Metrics | None = None

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        self.final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model needs a decoupled transaction policy")
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self._settings = ModelSettings(parameters)
        self._name = args["model_name"]
        model_dir = Path(args["model_repository"]) / args["model_version"]
        engine_args = json.loads((model_dir / "model.json").read_text())

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        self._sampling_params = SamplingParams
        self._structured = StructuredOutputsParams
        self._delta = RequestOutputKind.DELTA
        self._fields = dict(SamplingParams.__annotations__)
        self._engine_args = AsyncEngineArgs(**engine_args)
        if self._settings.metrics:
            labels = {"model": self._name, "version": args["model_version"]}
            self.metrics = _Metrics(pb_utils, labels, int(engine_args.get("max_model_len", 2048)))
            self.metrics.set_interval(self._settings.metrics_interval_s)
        self._healthy = True
        self._sender = _Sender(self, self._settings)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="tokenrelay-vllm", daemon=True
        )
        self._loop_thread.start()
        self._engine = asyncio.run_coroutine_threadsafe(self._start_engine(), self._loop).result()
        self._sender.start()

    async def _start_engine(self) -> Any:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        config = self._engine_args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        if self.metrics is None:
            return AsyncLLM.from_vllm_config(
                vllm_config=config, disable_log_stats=self._engine_args.disable_log_stats
            )
        # Our logger only: vLLM's default ones would gather Prometheus metrics nobody reads.
        return AsyncLLM.from_vllm_config(
            vllm_config=config,
            stat_loggers=[_stat_logger_factory(self.metrics)],
            disable_log_stats=True,
        )

    # Called by the sender thread.

    def log_error(self, message: str) -> None:
        self._pb.Logger.log_error(f"{self._name}: {message}")

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count(f"tokenrelay_model_requests_total:{outcome}", 1)

    def cancel(self, stream: _Stream) -> None:
        self._loop.call_soon_threadsafe(self._cancel_task, stream)

    def response(self, req: VllmRequest, pending: Pending) -> Any:
        pb = self._pb
        tensors = [
            pb.Tensor("text_output", np.array([pending.text.encode("utf-8")], dtype=np.object_))
        ]
        if req.want_finish:
            tensors.append(
                pb.Tensor("finish_reason", np.array([str(pending.finish_reason)], dtype=np.object_))
            )
        if req.want_cumulative_logprob:
            value = pending.cumulative_logprob
            tensors.append(
                pb.Tensor(
                    "cumulative_logprob",
                    np.array([np.nan if value is None else value], dtype=np.float32),
                )
            )
        if req.want_logprobs:
            tensors.append(
                pb.Tensor("logprobs", np.array([pending.logprobs_json()], dtype=np.object_))
            )
        if req.want_in:
            tensors.append(
                pb.Tensor("num_input_tokens", np.array([pending.prompt_tokens], dtype=np.uint32))
            )
        if req.want_out:
            tensors.append(
                pb.Tensor("num_output_tokens", np.array([pending.tokens], dtype=np.uint32))
            )
        return pb.InferenceResponse(output_tensors=tensors)

    def error_response(self, message: str, code: str) -> Any:
        pb = self._pb
        return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))

    # Triton's calls.

    def execute(self, requests: list[Any]) -> None:
        if self._settings.health_check and not self._check_health(requests):
            return None
        now = time.monotonic()
        tracing = self._settings.trace_path != ""
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = VllmRequest.from_inputs(
                    {n: self._text(request, n) for n in _STRING_INPUTS},
                    {n: self._flag(request, n) for n in _BOOL_INPUTS},
                    self._fields,
                    request.parameters(),
                )
                params = self._params(req)
            except BadRequest as exc:
                self._sender.reject(sender, str(exc))
                continue
            trace = None
            if tracing and req.stream:
                trace = {"id": str(request.request_id()), "execute": now}
            stream = _Stream(req, sender, now, trace, self._settings.response_interval_s)
            self._sender.register(stream)
            self._loop.call_soon_threadsafe(self._start_stream, stream, params)
        return None

    def finalize(self) -> None:
        if not hasattr(self, "_loop"):
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=60)
        finally:
            self._sender.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=30)
            if not self._loop_thread.is_alive():
                self._loop.close()

    # Helpers.

    def _input(self, request: Any, name: str) -> Any:
        tensor = self._pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(-1)[0]

    def _flag(self, request: Any, name: str) -> bool | None:
        value = self._input(request, name)
        return None if value is None else bool(value)

    def _text(self, request: Any, name: str) -> str | None:
        value = self._input(request, name)
        if value is None or isinstance(value, str):
            return value
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not valid UTF-8") from None

    def _params(self, req: VllmRequest) -> Any:
        fields = dict(req.sampling)
        try:
            if "structured_outputs" in fields:
                fields["structured_outputs"] = self._structured(**fields["structured_outputs"])
            return self._sampling_params(**fields, output_kind=self._delta)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"sampling parameters refused: {exc}") from None

    def _check_health(self, requests: list[Any]) -> bool:
        if self._healthy and getattr(self._engine, "errored", False):
            self._healthy = False
            self.log_error("the vLLM engine is dead; unloading the model")
            self._pb.unload_model(self._name)  # non-blocking
        if not self._healthy:
            for request in requests:
                sender = request.get_response_sender()
                response = self.error_response(
                    "Model is unavailable due to unhealthy vLLM engine", "UNAVAILABLE"
                )
                self._sender.call(functools.partial(sender.send, response, flags=self.final_flag))
        return self._healthy

    # On the loop thread.

    def _start_stream(self, stream: _Stream, params: Any) -> None:
        if stream.trace is not None:
            stream.trace["loop"] = time.monotonic()
        stream.task = self._loop.create_task(self._generate(stream, params))

    def _cancel_task(self, stream: _Stream) -> None:
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    async def _generate(self, stream: _Stream, params: Any) -> None:
        tokens = 0
        finished = False
        try:
            async for out in self._engine.generate(stream.req.prompt, params, stream.id):
                finished = finished or bool(out.finished)
                output = out.outputs[0]
                count = len(output.token_ids)
                tokens += count
                if stream.trace is not None and output.text and "output" not in stream.trace:
                    stream.trace["output"] = time.monotonic()
                self._sender.piece(
                    stream,
                    Piece(
                        text=output.text,
                        tokens=count,
                        prompt_tokens=len(out.prompt_token_ids or ()),
                        logprobs=_logprobs(output) if stream.req.want_logprobs else None,
                        cumulative_logprob=output.cumulative_logprob,
                        finish_reason=(output.finish_reason or "stop") if out.finished else None,
                    ),
                )
            if not finished:
                self._sender.fail(stream, "the engine ended the stream early", "INTERNAL", "failed")
        except asyncio.CancelledError:
            # Ours (the client went away): vLLM's generate() aborted the request on its way out.
            self._sender.fail(stream, "Request was cancelled", "CANCELLED", "cancelled")
            raise
        except ValueError as exc:
            message = context_error(str(exc)) or f"request refused: {exc}"
            self._sender.fail(stream, message, "INVALID_ARG", "rejected")
        except Exception as exc:
            self.log_error(f"generation failed: {exc!r}")
            self._sender.fail(stream, f"Error generating stream: {exc}", "INTERNAL", "failed")
        finally:
            if self.metrics is not None:
                self.metrics.count("tokenrelay_model_generated_tokens_total", tokens)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._engine.shutdown()
