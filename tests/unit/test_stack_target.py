"""TOKENRELAY_TEST_STACK: how the any_backend tests are pointed at a running stack."""

from __future__ import annotations

import pytest

from _support.target import TargetModels, target_from_env

GPU = "edge=http://gpu:8080/,orchestrator=gpu:50051,triton=gpu:8001,triton_model=smollm2_vllm"


def test_unset_or_empty_means_the_tiers_own_stack() -> None:
    assert target_from_env({}) is None
    assert target_from_env({"TOKENRELAY_TEST_STACK": "  "}) is None


def test_a_gpu_stack_with_triton_defaults() -> None:
    target = target_from_env({"TOKENRELAY_TEST_STACK": GPU})
    assert target is not None
    assert target.edge_url == "http://gpu:8080"
    assert target.orchestrator_address == "gpu:50051"
    assert target.triton_grpc == "gpu:8001"
    assert target.triton_metrics_url == "http://gpu:8002/metrics"  # Triton's gRPC port + 1
    assert target.models == TargetModels("smollm2-135m-instruct", "smollm2_vllm")


def test_metrics_and_model_can_be_named() -> None:
    text = "edge=http://h:1,orchestrator=h:2,triton=h:3,metrics=http://m:9/metrics,model=m1"
    target = target_from_env({"TOKENRELAY_TEST_STACK": text})
    assert target is not None
    assert target.triton_metrics_url == "http://m:9/metrics"
    assert target.models == TargetModels("m1", "smollm2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://gpu:8080", "is not key=value"),
        ("edge=http://h:1,orchestrator=h:2", "missing triton"),
        ("edge=h:1,orchestrator=h:2,triton=h:3", "edge must be a URL"),
        ("edge=http://h:1,orchestrator=h:2,triton=h", "triton must be host:port"),
        ("edge=http://h:1,orchestrator=h:2,triton=h:3,modle=x", "unknown key 'modle'"),
    ],
)
def test_a_malformed_value_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        target_from_env({"TOKENRELAY_TEST_STACK": text})
