"""Credentials and hostile input in process: API keys and their limits at the edge, the internal
secret at the orchestrator, CORS and security headers, and generated gRPC requests."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from _support import FakeSource, assert_openai, eventually
from tokenrelay.config import EdgeSettings, OrchestratorSettings, Secrets, Settings
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.security import ApiKey, Secret, hash_key, new_key
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb

SECRET = "internal-" + new_key()
ALICE, BOB, MALLORY = new_key(), new_key(), new_key()
BODY = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource(words=tuple(f" w{i}" for i in range(10)), interval_s=0.02)


@pytest.fixture
async def orchestrator(source: FakeSource) -> AsyncIterator[Orchestrator]:
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,), metrics_listen="127.0.0.1:0"),
        secrets=Secrets(internal=Secret(SECRET)),
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    keys = (
        ApiKey("alice", sha256=hash_key(ALICE), requests_per_minute=3),
        ApiKey("bob", sha256=hash_key(BOB), max_streams=1),
        ApiKey("mallory", sha256=hash_key(MALLORY), revoked=True),
    )
    path = tmp_path / "keys.toml"
    entries = [  # None: the tier's (TOML has no null)
        {k: v for k, v in dataclasses.asdict(key).items() if v is not None} for key in keys
    ]
    path.write_text(tomli_w.dumps({"keys": entries}))
    return path


@pytest.fixture
async def edge(orchestrator: Orchestrator, keys_file: Path) -> AsyncIterator[str]:
    settings = EdgeSettings(
        orchestrator=f"127.0.0.1:{orchestrator.port}",
        api_keys_file=str(keys_file),
        cors_origins=("https://chat.example",),
    )
    app = create_app(settings, Secrets(internal=Secret(SECRET)))
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    yield str(server.make_url(""))
    await server.close()


async def _post(
    session: ClientSession,
    url: str,
    key: str | None,
    body: dict[str, Any] = BODY,
    **headers: str,
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers.copy()


async def test_missing_wrong_and_revoked_keys_get_401(edge: str) -> None:
    async with ClientSession() as session:
        for key, code in ((None, "missing_api_key"), ("nope", "invalid_api_key")):
            status, body, _ = await _post(session, edge, key)
            assert status == 401 and body["error"]["code"] == code
            assert body["error"]["type"] == "authentication_error"
            assert_openai("ErrorResponse", body)
        status, body, _ = await _post(session, edge, MALLORY)
        assert status == 401 and "revoked" in body["error"]["message"]
        async with session.get(f"{edge}/v1/models") as response:
            assert response.status == 401  # every /v1/ route needs a key
        async with session.get(f"{edge}/healthz") as response:
            assert response.status == 200  # probes need none
        status, body, _ = await _post(session, edge, ALICE)
        assert status == 200 and body["usage"]["completion_tokens"] == 10


async def test_rate_and_concurrency_limits_per_key(edge: str, source: FakeSource) -> None:
    async with ClientSession() as session:
        results = [await _post(session, edge, ALICE) for _ in range(4)]
        assert [status for status, _, _ in results] == [200, 200, 200, 429]
        status, body, headers = results[-1]
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert int(headers["Retry-After"]) >= 19  # 3 per minute: the next token in ~20 s
        assert_openai("ErrorResponse", body)
        source.interval_s = 0.1  # bob's first request is still running when the second comes
        first = asyncio.create_task(_post(session, edge, BOB))
        assert await eventually(lambda: len(source.prompts) == 4)  # bob's first is running
        status, body, headers = await _post(session, edge, BOB)
        assert status == 429 and "at most 1" in body["error"]["message"]
        assert (await first)[0] == 200
        assert (await _post(session, edge, BOB))[0] == 200  # the slot came back


async def test_cors_allowlist_and_security_headers(edge: str) -> None:
    async with ClientSession() as session:
        preflight = {
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with session.options(f"{edge}/v1/chat/completions", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://chat.example"
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        evil = {**preflight, "Origin": "https://evil.example"}
        async with session.options(f"{edge}/v1/chat/completions", headers=evil) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        status, _, headers = await _post(session, edge, ALICE, Origin="https://chat.example")
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == "https://chat.example"
        status, _, headers = await _post(session, edge, "wrong", **{"X-Request-Id": "req-42"})
        assert status == 401
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Request-Id"] == "req-42"  # errors carry the id too


async def test_orchestrator_refuses_calls_without_the_internal_secret(
    orchestrator: Orchestrator,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.GenerateStreamRequest(model="synthetic", prompt="x")
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.GenerateStream(request, metadata=metadata):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", f"Bearer {SECRET}"),)
        assert (await stub.ListModels(pb.ListModelsRequest(), metadata=good)).models
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret


async def test_no_secret_or_key_reaches_the_logs(
    edge: str, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = "PROMPT-7f3a: tell nobody"
    body = {"model": "synthetic", "messages": [{"role": "user", "content": prompt}]}
    with caplog.at_level(logging.DEBUG, logger="tokenrelay"):
        async with ClientSession() as session:
            for key in (ALICE, BOB, MALLORY, "wrong-" + SECRET, None):
                await _post(session, edge, key, body)
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "revoked key refused" in text and "mallory" in text  # logs name keys by id
    for secret in (ALICE, BOB, MALLORY, SECRET, "PROMPT-7f3a", " w1"):  # keys, prompt, answer
        assert secret not in text


_TEXT = st.text(max_size=40)
_SAMPLING = st.builds(
    pb.SamplingParams,
    max_tokens=st.integers(-(2**31), 2**31 - 1),
    temperature=st.floats(width=32, allow_nan=True, allow_infinity=True),
    top_p=st.floats(width=32, allow_nan=True, allow_infinity=True),
    top_k=st.integers(-(2**31), 2**31 - 1),
    seed=st.integers(-(2**63), 2**63 - 1),
    stop=st.lists(st.text(max_size=200), max_size=6),
    presence_penalty=st.floats(width=32, allow_nan=True, allow_infinity=True),
    frequency_penalty=st.floats(width=32, allow_nan=True, allow_infinity=True),
)
_MESSAGE = st.builds(pb.ChatMessage, role=st.integers(0, 5), content=_TEXT)
_REQUEST = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from(["synthetic", "smollm2-135m-instruct", "", "nope", "synthetic\x00"]),
    chat=st.one_of(st.none(), st.builds(pb.Chat, messages=st.lists(_MESSAGE, max_size=4))),
    sampling=st.one_of(st.none(), _SAMPLING),
    request_id=st.text(max_size=200),
    labels=st.dictionaries(_TEXT, _TEXT, max_size=40),
    retrieval=st.one_of(
        st.none(),
        st.builds(
            rpb.RetrievalOptions,
            collection=_TEXT,
            top_k=st.integers(0, 2**32 - 1),
            min_score=st.floats(width=32, allow_nan=True, allow_infinity=True),
            on_failure=st.integers(0, 5),
        ),
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=_REQUEST, prompt=st.one_of(st.none(), _TEXT))
async def test_generated_requests_never_get_unknown_or_internal(
    orchestrator: Orchestrator, request: pb.GenerateRequest, prompt: str | None
) -> None:
    if prompt is not None and not request.HasField("chat"):
        request.prompt = prompt
    good = (("authorization", f"Bearer {SECRET}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            await stub.Generate(request, metadata=good, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
    assert code in {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    }, request
