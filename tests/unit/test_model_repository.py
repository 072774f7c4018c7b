"""The model repository: the CPU models speak exactly the vLLM backend's I/O, the GPU model is a
well-formed vLLM-backend model, and the GPU catalog matches it."""

from __future__ import annotations

import inspect
import json
import re

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from _support import REPO
from tokenrelay.config import load_settings
from tokenrelay.orchestrator import _triton
from tokenrelay.stack._triton import cpu_models

MODELS = REPO / "triton_models"

# What Triton's vLLM backend declares for every model it serves (auto_complete_config in
# triton-inference-server/vllm_backend src/model.py): name → (data type, dims, optional).
VLLM_INPUTS = {
    "text_input": ("TYPE_STRING", [1], False),
    "image": ("TYPE_STRING", [-1], True),
    "stream": ("TYPE_BOOL", [1], True),
    "sampling_parameters": ("TYPE_STRING", [1], True),
    "exclude_input_in_output": ("TYPE_BOOL", [1], True),
    "return_finish_reason": ("TYPE_BOOL", [1], True),
    "return_cumulative_logprob": ("TYPE_BOOL", [1], True),
    "return_logprobs": ("TYPE_BOOL", [1], True),
    "return_num_input_tokens": ("TYPE_BOOL", [1], True),
    "return_num_output_tokens": ("TYPE_BOOL", [1], True),
    "embedding_request": ("TYPE_STRING", [1], True),
}
VLLM_OUTPUTS = {
    "text_output": ("TYPE_STRING", [-1]),
    "finish_reason": ("TYPE_STRING", [-1]),
    "cumulative_logprob": ("TYPE_FP32", [-1]),
    "logprobs": ("TYPE_STRING", [-1]),
    "num_input_tokens": ("TYPE_UINT32", [1]),
    "num_output_tokens": ("TYPE_UINT32", [-1]),
}


def _config(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(
        (MODELS / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )


def _type(value: int) -> str:
    return str(model_config_pb2.DataType.Name(value))


def _used_by_the_orchestrator() -> tuple[set[str], set[str]]:
    """The inputs TritonNode sends and the outputs it asks for (with every option asked)."""
    source = inspect.getsource(_triton.TritonNode._request)
    inputs = set(re.findall(r'_(?:bytes|bool)_input\("(\w+)"', source))
    return inputs, {*_triton._OUTPUTS, "logprobs"}


# Inputs and outputs the orchestrator uses only for what a request asks (and the catalog entry
# says the model does): the model must declare them when its catalog entry says so.
OPTIONAL_IO = {"logprobs": ({"return_logprobs"}, {"logprobs"})}


@pytest.mark.parametrize("name", ["smollm2", "synthetic"])
def test_cpu_models_declare_exactly_the_vllm_backends_io(name: str) -> None:
    config = _config(name)
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0  # as the vLLM backend sets it
    for tensor in config.input:
        expected = VLLM_INPUTS[tensor.name]
        assert (_type(tensor.data_type), list(tensor.dims), tensor.optional) == expected
    for tensor in config.output:
        assert (_type(tensor.data_type), list(tensor.dims)) == VLLM_OUTPUTS[tensor.name]
    inputs, outputs = _used_by_the_orchestrator()
    assert inputs == {
        "text_input",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
        "return_finish_reason",
        "return_num_input_tokens",
        "return_num_output_tokens",
        "return_logprobs",
    }
    assert inputs <= set(VLLM_INPUTS) and outputs <= set(VLLM_OUTPUTS)
    (spec,) = [m for m in load_settings({}).models if m.triton_model == name]
    for capability, (extra_inputs, extra_outputs) in OPTIONAL_IO.items():
        if not getattr(spec, capability):
            inputs, outputs = inputs - extra_inputs, outputs - extra_outputs
    assert inputs <= {t.name for t in config.input}
    assert outputs <= {t.name for t in config.output}


def test_gpu_model_is_a_vllm_backend_model_the_cpu_stack_never_loads() -> None:
    config = _config("smollm2_vllm")
    assert config.backend == "vllm" and config.model_transaction_policy.decoupled
    assert [g.kind for g in config.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_MODEL
    ]
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters == {"REPORT_CUSTOM_METRICS": "true", "ENABLE_VLLM_HEALTH_CHECK": "true"}
    assert not config.input and not config.output  # the backend declares them (auto-complete)
    engine = json.loads((MODELS / "smollm2_vllm" / "1" / "model.json").read_text())
    assert engine["disable_log_stats"] is False  # else REPORT_CUSTOM_METRICS reports nothing
    assert set(engine) <= {
        "model",
        "gpu_memory_utilization",
        "max_model_len",
        "enable_prefix_caching",
        "tensor_parallel_size",
        "disable_log_stats",
    }
    assert cpu_models(MODELS) == ("minilm", "smollm2", "synthetic")


def test_gpu_catalog_matches_the_vllm_model() -> None:
    settings = load_settings({"TOKENRELAY_CONFIG": str(REPO / "deploy" / "tokenrelay.gpu.toml")})
    engine = json.loads((MODELS / "smollm2_vllm" / "1" / "model.json").read_text())
    (model,) = settings.models
    assert (MODELS / model.triton_model / "config.pbtxt").exists()
    assert model.context_window == engine["max_model_len"]
    assert settings.orchestrator.triton == ("dns:///triton:8001",)  # the headless Service
