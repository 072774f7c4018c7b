"""A gRPC client against the orchestrator: unary, streaming, health, reflection, bad input."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from tokenrelay.stack import Stack
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

SMOL = "smollm2-135m-instruct"


@pytest.fixture
def channel(stack: Stack):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        yield channel


def _chat(text: str) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)])


def test_unary_generate(stack: Stack, channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    response = stub.Generate(
        pb.GenerateRequest(
            model=SMOL,
            chat=_chat("What is 2+2?"),
            sampling=pb.SamplingParams(max_tokens=24, temperature=0),
            request_id="unary-1",
        ),
        timeout=60,
    )
    assert response.text.strip()
    assert response.request_id == "unary-1"
    assert response.served_by.model == SMOL and response.served_by.node == stack.triton_grpc
    assert response.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    usage = response.usage
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_generate(stack: Stack, channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    messages = list(
        stub.GenerateStream(
            pb.GenerateStreamRequest(
                model="synthetic", prompt="one two three", sampling=pb.SamplingParams(max_tokens=7)
            ),
            timeout=30,
        )
    )
    assert messages[0].HasField("start") and messages[0].start.request_id
    assert messages[0].start.served_by.node == stack.triton_grpc
    assert not any(m.HasField("start") for m in messages[1:])
    assert messages[-1].HasField("end") and not any(m.HasField("end") for m in messages[:-1])
    end = messages[-1].end
    assert end.finish_reason == pb.FINISH_REASON_LENGTH
    assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (3, 7)
    assert len("".join(m.text for m in messages).split()) == 7


def test_list_models_health_and_reflection(channel: grpc.Channel) -> None:
    listing = pb_grpc.GenerationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    assert {m.id: (m.ready, m.kind) for m in listing.models} == {
        SMOL: (True, pb.MODEL_KIND_CHAT),
        "synthetic": (True, pb.MODEL_KIND_CHAT),
        "all-minilm-l6-v2": (True, pb.MODEL_KIND_EMBEDDING),
    }
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tokenrelay.v1.GenerationService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "tokenrelay.v1.GenerationService" in database.get_services()
    method = database.FindFileContainingSymbol("tokenrelay.v1.GenerationService")
    assert method.package == "tokenrelay.v1"


@pytest.mark.parametrize(
    ("request_", "code", "param"),
    [
        (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "model"),
        (pb.GenerateRequest(prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (pb.GenerateRequest(model="synthetic"), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (
            pb.GenerateRequest(model="synthetic", chat=pb.Chat()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages",
        ),
        (
            pb.GenerateRequest(
                model="synthetic", prompt="x", sampling=pb.SamplingParams(max_tokens=-5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            pb.GenerateRequest(
                model="synthetic", prompt="x", sampling=pb.SamplingParams(temperature=float("nan"))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            pb.GenerateRequest(
                model="synthetic", prompt="x", sampling=pb.SamplingParams(stop=["a"] * 5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stop",
        ),
        (
            pb.GenerateRequest(
                model="synthetic", chat=pb.Chat(messages=[pb.ChatMessage(content="no role")])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role",
        ),
    ],
)
def test_bad_requests_get_clear_status(
    channel: grpc.Channel, request_: pb.GenerateRequest, code: grpc.StatusCode, param: str
) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request_, timeout=10)
    error = caught.value
    assert error.code() == code  # type: ignore[attr-defined]
    assert error.details() and "Traceback" not in error.details()  # type: ignore[attr-defined]
    # The details, as any gRPC client reads them (google.rpc.Status in the standard trailer).
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None and status.code == code.value[0]
    details = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    details["google.rpc.ErrorInfo"].Unpack(info)
    details["google.rpc.BadRequest"].Unpack(bad)
    assert info.domain == "tokenrelay"
    not_found = code == grpc.StatusCode.NOT_FOUND
    assert info.reason == ("MODEL_NOT_FOUND" if not_found else "INVALID_REQUEST")
    assert [v.field for v in bad.field_violations] == [param]
    # The orchestrator keeps serving.
    ok = stub.Generate(
        pb.GenerateRequest(model="synthetic", prompt="x", sampling=pb.SamplingParams(max_tokens=2)),
        timeout=10,
    )
    assert ok.usage.completion_tokens == 2


def test_deadline_is_honoured(channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        # 500 tokens at 20 ms each cannot finish in 0.3 s.
        stub.Generate(
            pb.GenerateRequest(
                model="synthetic", prompt="x", sampling=pb.SamplingParams(max_tokens=500)
            ),
            timeout=0.3,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
