"""Hostile bytes at both borders: no body the edge can be sent gets a 5xx, and no message the
orchestrator can be sent gets UNKNOWN or INTERNAL — whatever the bytes, the answer is a clear
client error, and the service keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _support import FakeEmbedder, FakeSource, assert_openai
from tokenrelay.config import EdgeSettings, Embeddings, OrchestratorSettings, Settings
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.retrieval._qdrant import QdrantStore
from tokenrelay.v1 import generation_pb2, retrieval_pb2

_VALID = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
_DEEP = (
    b'{"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "x": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}"
)
_LONE_SURROGATE = b'{"model": "synthetic", "messages": [{"role": "user", "content": "\\ud800"}]}'
_PAIR = b'{"model": "synthetic", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource(words=(" a", " b", " c"))


@pytest.fixture
async def orchestrator(source: FakeSource, tmp_path: Path) -> AsyncIterator[Orchestrator]:
    """With retrieval on (an embedder and an embedded Qdrant), so that every service is served."""
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,), metrics_listen=""),
        embeddings=Embeddings(dimensions=8),
    )
    orchestrator = Orchestrator(
        settings,
        sources={source.name: source},
        embedding_sources=[FakeEmbedder()],
        store=QdrantStore(path=str(tmp_path / "qdrant")),
    )
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)


@pytest.fixture
async def edge(orchestrator: Orchestrator) -> AsyncIterator[str]:
    app = create_app(EdgeSettings(orchestrator=f"127.0.0.1:{orchestrator.port}"))
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    yield str(server.make_url(""))
    await server.close()


async def _post(url: str, path: str, body: bytes) -> tuple[int, Any]:
    async with (
        ClientSession() as session,
        session.post(
            f"{url}{path}", data=body, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def test_deep_nesting_and_lone_surrogates_are_clear_400s(edge: str) -> None:
    status, body = await _post(edge, "/v1/chat/completions", _DEEP)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    assert_openai("ErrorResponse", body)
    status, body = await _post(edge, "/v1/chat/completions", _LONE_SURROGATE)
    assert status == 400 and "surrogate" in body["error"]["message"]
    assert_openai("ErrorResponse", body)
    # A surrogate pair is an ordinary character: served.
    status, body = await _post(edge, "/v1/chat/completions", _PAIR)
    assert status == 200 and body["choices"][0]["message"]["content"] == " a b c"


_VALID_BYTES = json.dumps(_VALID).encode()
_SPLICES = [b"\\ud800", b"[", b"{", b'"', b"\xff", b"\xed\xa0\x80", b"1e999", b"NaN"]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid request cut, spliced or with bytes replaced."""
    raw = bytearray(_VALID_BYTES)
    for _ in range(draw(st.integers(1, 6))):
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        kind = draw(st.sampled_from(["cut", "flip", "insert", "dup"]))
        if kind == "cut":
            del raw[at:]
        elif kind == "flip":
            raw[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.sampled_from(_SPLICES))
        else:
            raw[at:at] = raw[at : at + draw(st.integers(1, 40))]
    return bytes(raw)


def _mutations() -> st.SearchStrategy[bytes]:
    """Raw bodies: random bytes, and mutated valid requests."""
    return st.one_of(st.binary(max_size=300), _mutated())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(raw=_DEEP, path="/v1/chat/completions")
@example(raw=_LONE_SURROGATE, path="/v1/completions")
@example(raw=b'{"model": "synthetic", "input": "\\udfff"}', path="/v1/embeddings")
@given(
    raw=_mutations(),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
)
async def test_no_body_gets_a_server_error(edge: str, raw: bytes, path: str) -> None:
    status, body = await _post(edge, path, raw)
    assert status < 500, (raw, body)
    if status >= 400:
        assert_openai("ErrorResponse", body)


# ---- the gRPC border ------------------------------------------------------------------------

# Every service of tokenrelay.v1 (generation, embeddings, retrieval) and gRPC health.
_SERVICES = [
    service
    for module in (generation_pb2, retrieval_pb2, health_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
]
# Every RPC the orchestrator serves (with retrieval on), and whether its request message has a
# string field 1 (one that bytes which are not UTF-8 cannot decode into).
_METHODS = [
    (
        f"/{service.full_name}/{m.name}",
        m.server_streaming,
        1 in m.input_type.fields_by_number
        and m.input_type.fields_by_number[1].type == FieldDescriptor.TYPE_STRING,
    )
    for service in _SERVICES
    for m in service.methods
]
_SERVER_FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_NESTED_GROUPS = b"\x7b" * 20_000  # start-group of field 15, 20,000 deep, never closed
_BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (model, name, …): a string that is not UTF-8
_CESU8 = b"\x0a\x03\xed\xa0\x80"  # field 1: a lone surrogate in CESU-8
_TRUNCATED = generation_pb2.GenerateRequest(model="synthetic", prompt="hello").SerializeToString()[
    :-3
]


async def _call(
    channel: grpc.aio.Channel, method: str, streaming: bool, raw: bytes
) -> grpc.aio.AioRpcError | None:
    try:
        if streaming:
            call = channel.unary_stream(method)(raw, timeout=5)
            async for _ in call:
                break
            call.cancel()
        else:
            await channel.unary_unary(method)(raw, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def test_undecodable_messages_get_invalid_argument_on_every_rpc(
    orchestrator: Orchestrator,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        for raw in (_NESTED_GROUPS, _BAD_UTF8, _CESU8, _TRUNCATED):
            for method, streaming, string_field_1 in _METHODS:
                error = await _call(channel, method, streaming, raw)
                if raw in (_BAD_UTF8, _CESU8) and not string_field_1:
                    # Field 1 is unknown to their request messages (ListModels, Status,
                    # ListCollections have no fields): an unknown field decodes.
                    assert error is None or error.code() not in _SERVER_FAULTS, error
                    continue
                assert error is not None, (method, raw[:8])
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
                assert "class" not in (error.details() or ""), error.details()
        # And it keeps serving.
        stub = channel.unary_unary(
            "/tokenrelay.v1.GenerationService/Generate",
            request_serializer=generation_pb2.GenerateRequest.SerializeToString,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        answer = await stub(
            generation_pb2.GenerateRequest(model="synthetic", prompt="x"), timeout=5
        )
        assert answer.text == " a b c"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(raw=_NESTED_GROUPS)
@example(raw=_CESU8)
@given(raw=st.binary(max_size=200))
async def test_random_wire_bytes_never_get_unknown_or_internal(
    orchestrator: Orchestrator, raw: bytes
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        for method, streaming, _ in _METHODS:
            error = await _call(channel, method, streaming, raw)
            if error is None:
                continue
            assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                method,
                raw,
                error,
            )
            assert "class" not in (error.details() or "")
