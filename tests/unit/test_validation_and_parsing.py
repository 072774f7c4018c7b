"""Request validation in the orchestrator and OpenAI body parsing at the edge."""

from __future__ import annotations

import pytest

from tokenrelay.config import Limits, ModelSpec
from tokenrelay.edge import _openai as oa
from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import ChatMessage, GenerationRequest, Sampling
from tokenrelay.orchestrator._plan import validate
from tokenrelay.v1 import generation_pb2 as pb

SPEC = ModelSpec(id="m", triton_model="m", context_window=100, default_max_tokens=16)


def _chat(**sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model="m",
        messages=(ChatMessage("user", "hi"),),
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(max_tokens=101), "max_tokens"),
        (_chat(temperature=2.5), "temperature"),
        (_chat(temperature=float("inf")), "temperature"),
        (_chat(top_p=0.0), "top_p"),
        (_chat(top_k=-2), "top_k"),
        (_chat(presence_penalty=-3.0), "presence_penalty"),
        (_chat(stop=("a", "b", "c", "d", "e")), "stop"),
        (_chat(stop=("",)), "stop"),
        (GenerationRequest(model="m"), "messages"),
        (GenerationRequest(model="m", prompt=""), "prompt"),
        (GenerationRequest(model="m", messages=()), "messages"),
        (GenerationRequest(model="m", messages=(ChatMessage("robot", "x"),)), "messages[0].role"),
        (
            GenerationRequest(model="m", messages=(ChatMessage("user", "x" * 11),)),
            "messages[0].content",
        ),
        (GenerationRequest(model="m", prompt="x", request_id="r" * 200), "request_id"),
    ],
)
def test_validation_names_the_field(request_: GenerationRequest, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(request_, SPEC, Limits(max_message_chars=10))
    assert caught.value.param == param


def test_valid_request_passes() -> None:
    validate(_chat(max_tokens=100, temperature=0.0, top_p=1.0, stop=("x",)), SPEC, Limits())


def test_openai_chat_body_becomes_a_stream_request() -> None:
    parsed = oa.parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "temperature": 0,
            "stop": "END",
            "seed": 2**40,
            "stream": True,
            "stream_options": {"include_usage": True},
            "metadata": {"trace": "x"},  # unknown to tokenrelay: ignored
        },
        "rid",
    )
    request = parsed.request
    assert parsed.stream and parsed.include_usage
    assert [m.role for m in request.chat.messages] == [
        pb.ROLE_SYSTEM,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
    ]
    assert request.chat.messages[1].content == "ab"
    assert request.sampling.max_tokens == 7 and request.sampling.HasField("temperature")
    assert list(request.sampling.stop) == ["END"] and request.sampling.seed == 2**40
    assert request.request_id == "rid"
    assert not request.HasField("stream_interval_ms")  # unset: the model's default


def test_the_stream_interval_extension_reaches_the_grpc_request() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert oa.parse_chat({**body, "stream_interval_ms": 0}, "r").request.stream_interval_ms == 0
    completion = oa.parse_completion({"model": "m", "prompt": "p", "stream_interval_ms": 25}, "r")
    assert completion.request.stream_interval_ms == 25


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "model"),
        ({"model": "m"}, "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"model": "m", "messages": [], "top_k": 1.5}, "top_k"),
        (
            {"model": "m", "messages": [], "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ({"model": "m", "messages": [], "logprobs": "yes"}, "logprobs"),
        ({"model": "m", "messages": [], "stream_interval_ms": -1}, "stream_interval_ms"),
        ({"model": "m", "messages": [], "stream_interval_ms": "10"}, "stream_interval_ms"),
        # An object or an array where one of a few strings goes (unhashable: once a 500).
        (
            {"model": "m", "messages": [], "retrieval": {"collection": "c", "on_failure": {}}},
            "retrieval.on_failure",
        ),
        ({"model": "m", "messages": [], "response_format": {"type": []}}, "response_format"),
        ({"model": "m", "messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),
    ],
)
def test_openai_chat_body_type_errors(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        oa.parse_chat(body, "rid")
    assert caught.value.param == param


@pytest.mark.parametrize("body", [b"NaN", b'{"a": Infinity}', b"\xff", b"[]", b"{"])
def test_body_parsing_refuses_what_json_allows_too_loosely(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        oa.loads(body)
