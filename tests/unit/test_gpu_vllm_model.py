"""tokenrelay's vLLM Triton model (triton_python/vllm_engine.py) with Triton's stub API and vLLM's
AsyncLLM replaced by fakes of their interfaces (this machine has neither a GPU nor vLLM): the
contract of Triton's vLLM backend, merging of deltas, cancellation reaching the engine, errors."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

FINAL = 1


class _Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> Any:
        return self._array


class _Error:
    INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = (
        "INVALID_ARG",
        "INTERNAL",
        "CANCELLED",
        "UNAVAIL",
    )

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class _Metric:
    def __init__(self, labels: dict[str, str], buckets: Any = None) -> None:
        self.labels, self.value, self.observed = labels, 0.0, []

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.observed.append(value)


class _Family:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    made: dict[str, list[_Metric]] = {}  # noqa: RUF012

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name
        _Family.made[name] = []

    def Metric(self, labels: dict[str, str], buckets: Any = None) -> _Metric:
        metric = _Metric(labels, buckets)
        _Family.made[self.name].append(metric)
        return metric


def _pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor  # type: ignore[attr-defined]
    pb.TritonError = _Error  # type: ignore[attr-defined]
    pb.InferenceResponse = _Response  # type: ignore[attr-defined]
    pb.MetricFamily = _Family  # type: ignore[attr-defined]
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL  # type: ignore[attr-defined]
    pb.TritonModelException = RuntimeError  # type: ignore[attr-defined]
    pb.Logger = types.SimpleNamespace(log_error=lambda m: None)  # type: ignore[attr-defined]
    pb.using_decoupled_model_transaction_policy = lambda c: True  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda r, n: r.inputs.get(n)  # type: ignore[attr-defined]
    pb.unload_model = lambda name: None  # type: ignore[attr-defined]
    return pb


class _Sender:
    def __init__(self, delay_s: float = 0.0, cancel_after: int = 0) -> None:
        self.responses: list[tuple[_Response, int]] = []
        self.delay_s, self.cancel_after = delay_s, cancel_after
        self.done = threading.Event()

    def send(self, response: _Response, flags: int = 0) -> None:
        time.sleep(self.delay_s)
        self.responses.append((response, flags))
        if flags == FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        if self.cancel_after < 0:
            return True
        return bool(self.cancel_after) and len(self.responses) >= self.cancel_after

    def texts(self) -> list[str]:
        return [r.outputs["text_output"][0].decode() for r, _ in self.responses if not r.error]


class _Request:
    def __init__(self, sender: _Sender, parameters: str = "{}", **inputs: Any) -> None:
        self._sender = sender
        self._parameters = parameters  # Triton's JSON text of the request parameters
        self.inputs = {}
        for name, value in inputs.items():
            if isinstance(value, bool):
                self.inputs[name] = _Tensor(name, np.array([value]))
            else:
                self.inputs[name] = _Tensor(name, np.array([value.encode()], dtype=object))

    def get_response_sender(self) -> _Sender:
        return self._sender

    def request_id(self) -> str:
        return "r-1"

    def parameters(self) -> str:
        return self._parameters


class _Engine:
    """AsyncLLM's generate/abort/shutdown: one delta per token, ``gap_s`` apart."""

    def __init__(self) -> None:
        self.tokens_per_request = 8
        self.gap_s = 0.0
        self.first_gap_s = 0.0  # before the first output only
        self.empty_first = False  # the first output carries a token but no text yet
        self.seen: list[Any] = []
        self.aborted: list[str] = []
        self.errored = False

    async def generate(self, prompt: str, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.seen.append(params)
        count = params.kwargs.get("max_tokens") or self.tokens_per_request
        try:
            for i in range(count):
                if self.gap_s:
                    await asyncio.sleep(self.gap_s)
                if i == 0 and self.first_gap_s:
                    await asyncio.sleep(self.first_gap_s)
                done = i == count - 1
                output = types.SimpleNamespace(
                    text="" if i == 0 and self.empty_first else f" t{i}",
                    token_ids=[i],
                    logprobs=[
                        {i: types.SimpleNamespace(logprob=-0.5, rank=1, decoded_token=f" t{i}")}
                    ]
                    if params.kwargs.get("logprobs")
                    else None,
                    cumulative_logprob=-0.5 * (i + 1),
                    finish_reason="length" if done else None,
                )
                yield types.SimpleNamespace(
                    outputs=[output], prompt_token_ids=[1, 2, 3], finished=done
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)  # as vLLM's generate() does on its way out
            raise

    def shutdown(self) -> None:
        pass


class _SamplingParams:
    max_tokens: int | None
    temperature: float
    seed: int | None
    stop: str | list[str] | None
    logprobs: int | None
    ignore_eos: bool
    n: int
    structured_outputs: Any
    output_kind: Any
    logit_bias: dict[int, float] | None

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(type(self).__annotations__)
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        if kwargs.get("temperature", 1.0) < 0:
            raise ValueError("temperature must be non-negative")
        self.kwargs = kwargs


@pytest.fixture
def vllm_fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Engine]:
    engine = _Engine()
    modules: dict[str, Any] = {"triton_python_backend_utils": _pb_utils()}
    for name in (
        "vllm",
        "vllm.engine",
        "vllm.engine.arg_utils",
        "vllm.sampling_params",
        "vllm.usage",
        "vllm.usage.usage_lib",
        "vllm.v1",
        "vllm.v1.engine",
        "vllm.v1.engine.async_llm",
        "vllm.v1.metrics",
        "vllm.v1.metrics.loggers",
    ):
        modules[name] = types.ModuleType(name)

    class EngineArgs:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs, self.disable_log_stats = kwargs, kwargs.get("disable_log_stats", False)

        def create_engine_config(self, context: Any) -> Any:
            return self.kwargs

    class AsyncLLM:
        @staticmethod
        def from_vllm_config(vllm_config: Any, **kwargs: Any) -> _Engine:
            for factory in kwargs.get("stat_loggers") or ():
                engine.stat_logger = factory(vllm_config, 0)  # type: ignore[attr-defined]
            return engine

    modules["vllm.engine.arg_utils"].AsyncEngineArgs = EngineArgs
    modules["vllm.sampling_params"].SamplingParams = _SamplingParams
    modules["vllm.sampling_params"].StructuredOutputsParams = lambda **kw: ("structured", kw)
    modules["vllm.sampling_params"].RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    modules["vllm.usage.usage_lib"].UsageContext = types.SimpleNamespace(ENGINE_CONTEXT="e")
    modules["vllm.v1.engine.async_llm"].AsyncLLM = AsyncLLM
    modules["vllm.v1.metrics.loggers"].StatLoggerBase = object
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield engine


def _start_model(tmp_path: Any, **parameters: str) -> Any:
    from tokenrelay.triton_python.vllm_engine import TritonPythonModel

    (tmp_path / "1").mkdir(exist_ok=True)
    (tmp_path / "1" / "model.json").write_text(json.dumps({"model": "m", "max_model_len": 2048}))
    instance = TritonPythonModel()
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_name": "smollm2_vllm",
            "model_repository": str(tmp_path),
            "model_version": "1",
        }
    )
    return instance


@pytest.fixture
def model(vllm_fakes: _Engine, tmp_path: Any) -> Iterator[Any]:
    instance = _start_model(tmp_path, cancel_poll_ms="10")
    yield instance
    instance.finalize()


def _stream_request(
    sender: _Sender, sampling: dict[str, Any], parameters: str = "{}", **flags: bool
) -> _Request:
    return _Request(
        sender,
        parameters,
        text_input="<|im_start|>user\nhi<|im_end|>\n",
        stream=True,
        sampling_parameters=json.dumps(sampling),
        exclude_input_in_output=True,
        return_finish_reason=True,
        return_num_input_tokens=True,
        return_num_output_tokens=True,
        **flags,
    )


def _wait(sender: _Sender) -> None:
    assert sender.done.wait(5), "no final response"


def test_streams_the_vllm_backends_outputs_and_ends_with_the_final_flag(model: Any) -> None:
    sender = _Sender()
    model.execute([_stream_request(sender, {"max_tokens": "5", "temperature": "0"})])
    _wait(sender)
    assert "".join(sender.texts()) == " t0 t1 t2 t3 t4"
    outputs = [r.outputs for r, _ in sender.responses]
    assert sum(int(o["num_output_tokens"][0]) for o in outputs) == 5
    assert {int(o["num_input_tokens"][0]) for o in outputs} == {3}
    assert [o["finish_reason"][0] for o in outputs][-1] == "length"
    assert all(o["finish_reason"][0] == "None" for o in outputs[:-1])
    assert [f for _, f in sender.responses] == [0] * (len(outputs) - 1) + [FINAL]
    params = model._engine.seen[0].kwargs
    assert params["max_tokens"] == 5 and params["temperature"] == 0.0  # strings converted
    assert params["output_kind"] == "delta"


def test_merges_deltas_while_the_sender_is_busy_but_never_delays_the_first(
    model: Any, vllm_fakes: _Engine
) -> None:
    vllm_fakes.gap_s = 0.001
    sender = _Sender(delay_s=0.02)  # sending is slower than the engine
    model.execute([_stream_request(sender, {"max_tokens": 60})])
    _wait(sender)
    texts = sender.texts()
    assert texts[0] == " t0"  # alone: the first token is sent as soon as it comes
    assert len(texts) < 30  # ... the rest in fewer, fuller responses
    assert "".join(texts) == "".join(f" t{i}" for i in range(60))
    counts = [int(r.outputs["num_output_tokens"][0]) for r, _ in sender.responses]
    assert sum(counts) == 60 and max(counts) > 1


def test_time_based_merging_never_holds_the_first_text(vllm_fakes: _Engine, tmp_path: Any) -> None:
    # A long response interval; the engine's first output has a token but no text yet (as
    # vLLM's detokenizer can send): that empty response must not start the interval, or the
    # first visible token would wait for it.
    vllm_fakes.empty_first = True
    vllm_fakes.gap_s = 0.01
    model = _start_model(tmp_path, response_interval_ms="2000")
    try:
        sender = _Sender()
        began = time.monotonic()
        model.execute([_stream_request(sender, {"max_tokens": 6})])
        deadline = time.monotonic() + 5
        while len(sender.texts()) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        first_text = time.monotonic() - began
        assert sender.texts()[:2] == ["", " t1"]  # the empty one, then the text at once
        assert first_text < 1.0  # nowhere near the 2 s interval
        _wait(sender)
        # ... and later pieces are merged by the interval (all of them, here, into the last).
        assert sender.texts() == ["", " t1", " t2 t3 t4 t5"]
        counts = [int(r.outputs["num_output_tokens"][0]) for r, _ in sender.responses]
        assert counts == [1, 1, 4]
    finally:
        model.finalize()


def test_the_requests_stream_interval_merges_its_responses_after_the_first(
    model: Any, vllm_fakes: _Engine
) -> None:
    # The orchestrator's stream_interval_ms request parameter: this model (with no interval of
    # its own) holds later tokens for it, so a stream interval also cuts the responses sent.
    vllm_fakes.gap_s = 0.01
    sender, plain = _Sender(), _Sender()
    model.execute(
        [
            _stream_request(sender, {"max_tokens": 6}, json.dumps({"stream_interval_ms": 2000})),
            _stream_request(plain, {"max_tokens": 6}, json.dumps({"other": 1})),
        ]
    )
    _wait(sender)
    _wait(plain)
    assert sender.texts() == [" t0", " t1 t2 t3 t4 t5"]  # the first at once, the rest merged
    counts = [int(r.outputs["num_output_tokens"][0]) for r, _ in sender.responses]
    assert counts == [1, 5]
    assert len(plain.texts()) == 6  # without it, each token goes out as it comes


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"stream_interval_ms": -1}, "must be between 0 and 10000"),
        ({"stream_interval_ms": 10_001}, "must be between 0 and 10000"),
        ({"stream_interval_ms": "10"}, "must be an integer"),
        ({"stream_interval_ms": True}, "must be an integer"),
    ],
)
def test_refuses_a_bad_stream_interval_parameter(
    model: Any, vllm_fakes: _Engine, parameters: dict[str, Any], message: str
) -> None:
    sender = _Sender()
    model.execute([_stream_request(sender, {"max_tokens": 2}, json.dumps(parameters))])
    _wait(sender)
    ((response, flags),) = sender.responses
    assert flags == FINAL and response.error.code == "INVALID_ARG"
    assert message in response.error.message and "stream_interval_ms" in response.error.message
    assert not vllm_fakes.seen


def test_a_request_cancelled_before_its_first_output_is_aborted(
    model: Any, vllm_fakes: _Engine
) -> None:
    # New requests reach the sender thread without waking it: it must still find this one and
    # poll it while vLLM has produced nothing for it (a long prefill, a grammar compiling).
    vllm_fakes.first_gap_s = 30
    sender = _Sender()
    sender.cancel_after = -1  # cancelled from the start (is_cancelled is true at once)
    model.execute([_stream_request(sender, {"max_tokens": 4})])
    _wait(sender)
    ((last, flags),) = sender.responses
    assert flags == FINAL and last.error.code == "CANCELLED"
    assert len(vllm_fakes.aborted) == 1


def test_the_trace_gives_each_streaming_request_its_first_token_times(
    vllm_fakes: _Engine, tmp_path: Any
) -> None:
    trace = tmp_path / "trace.jsonl"
    model = _start_model(tmp_path, trace_path=str(trace))
    try:
        sender = _Sender()
        model.execute([_stream_request(sender, {"max_tokens": 3})])
        _wait(sender)
    finally:
        model.finalize()
    (line,) = trace.read_text().splitlines()
    times = json.loads(line)
    assert times["id"] == "r-1"
    order = [times[k] for k in ("execute", "loop", "output", "build", "sent")]
    assert order == sorted(order) and order[-1] - order[0] < 5


def test_cancellation_aborts_the_engine_request(model: Any, vllm_fakes: _Engine) -> None:
    vllm_fakes.gap_s = 0.005
    sender = _Sender(cancel_after=2)
    model.execute([_stream_request(sender, {"max_tokens": 1000})])
    _wait(sender)
    last, flags = sender.responses[-1]
    assert flags == FINAL and last.error is not None and last.error.code == "CANCELLED"
    assert len(vllm_fakes.aborted) == 1
    assert sum(int(r.outputs["num_output_tokens"][0]) for r, _ in sender.responses[:-1]) < 1000
    model._sender.call(lambda: None)
    deadline = time.monotonic() + 3
    cancelled = _Family.made["tokenrelay_model_requests_total"][1]
    while cancelled.value < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled.labels["outcome"] == "cancelled" and cancelled.value == 1


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"no_such": 1}, "unknown sampling parameter 'no_such'"),
        ({"max_tokens": "many"}, "sampling parameter 'max_tokens' must be int"),
        ({"structured_outputs": {"json": {}}}, "written as a string"),
        ({"n": 2}, "'n'"),
        ({"temperature": -1}, "sampling parameters refused"),
        ({"lora_name": "x"}, "no LoRA adapters"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"7": 101}}, "must be in [-100, 100]"),
    ],
)
def test_refuses_bad_parameters_before_the_engine(
    model: Any, vllm_fakes: _Engine, sampling: dict[str, Any], message: str
) -> None:
    sender = _Sender()
    model.execute([_stream_request(sender, sampling)])
    _wait(sender)
    ((response, flags),) = sender.responses
    assert flags == FINAL and response.error.code == "INVALID_ARG"
    assert message in response.error.message
    assert not vllm_fakes.seen


def test_passes_structured_outputs_logprobs_and_counts_through(
    model: Any, vllm_fakes: _Engine
) -> None:
    sender = _Sender()
    constraint = json.dumps({"json": {"type": "object"}})
    model.execute(
        [
            _stream_request(
                sender,
                {
                    "max_tokens": 3,
                    "logprobs": 1,
                    "structured_outputs": constraint,
                    "seed": "7",
                    "logit_bias": {"12": -100},
                },
                return_logprobs=True,
                return_cumulative_logprob=True,
            )
        ]
    )
    _wait(sender)
    params = vllm_fakes.seen[0].kwargs
    assert params["structured_outputs"] == ("structured", {"json": {"type": "object"}})
    assert params["logit_bias"] == {12: -100.0}  # JSON's string keys as the token ids vLLM takes
    assert params["seed"] == 7
    entries = [e for r, _ in sender.responses for e in json.loads(r.outputs["logprobs"][0])]
    assert len(entries) == 3 and entries[0]["0"]["decoded_token"] == " t0"
    assert float(sender.responses[-1][0].outputs["cumulative_logprob"][0]) == pytest.approx(-1.5)


def test_a_request_that_does_not_stream_gets_one_response_with_the_prompt(model: Any) -> None:
    sender = _Sender()
    request = _Request(
        sender,
        text_input="Q:",
        stream=False,
        sampling_parameters=json.dumps({"max_tokens": 4}),
        exclude_input_in_output=False,
    )
    model.execute([request])
    _wait(sender)
    assert sender.texts() == ["Q: t0 t1 t2 t3"] and sender.responses[0][1] == FINAL


def test_streaming_with_the_prompt_repeated_is_refused_as_the_backend_does(model: Any) -> None:
    sender = _Sender()
    request = _Request(sender, text_input="Q:", stream=True, exclude_input_in_output=False)
    model.execute([request])
    _wait(sender)
    assert "exclude_input_in_output" in sender.responses[0][0].error.message
