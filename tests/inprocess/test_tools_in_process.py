"""Tools, logprobs and n through the real gRPC hop and edge, over a fake token source: what the
model is sent (template, constraint) and what the client gets (OpenAI shapes, typed gRPC)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from _support import FakeSource, assert_openai
from tokenrelay.config import EdgeSettings, ModelSpec, OrchestratorSettings, Settings
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

CALL_WORDS = (
    "On it.",
    "\n<tool_call>\n",
    '{"name": "get_weather",',
    ' "arguments": {"city": "Oslo"}}',
    "\n</tool_call>",
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource(words=CALL_WORDS)


@pytest.fixture
async def orchestrator(source: FakeSource) -> AsyncIterator[Orchestrator]:
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,), metrics_listen="127.0.0.1:0"),
        models=(
            ModelSpec(id="agentic", triton_model="agentic", tool_parser="hermes"),
            ModelSpec(id="plain", triton_model="plain"),
        ),
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)


@pytest.fixture
async def edge(orchestrator: Orchestrator) -> AsyncIterator[str]:
    settings = EdgeSettings(orchestrator=f"127.0.0.1:{orchestrator.port}")
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url(""))
    await server.close()


async def _post(edge: str, body: dict[str, Any]) -> tuple[int, str]:
    async with (
        ClientSession() as session,
        session.post(f"{edge}/v1/chat/completions", json=body) as response,
    ):
        return response.status, (await response.read()).decode()


async def test_a_model_without_a_tool_parser_refuses_tools(source: FakeSource, edge: str) -> None:
    status, raw = await _post(edge, {"model": "plain", "messages": ASK, "tools": [WEATHER]})
    assert status == 400
    error = json.loads(raw)
    assert_openai("ErrorResponse", error)
    assert error["error"]["param"] == "tools" and "tool_parser" in error["error"]["message"]
    assert source.prompts == []  # nothing reached the model


async def test_two_choices_with_calls_and_logprobs_stream_through_both_hops(
    source: FakeSource, edge: str
) -> None:
    body = {
        "model": "agentic",
        "messages": ASK,
        "tools": [WEATHER],
        "n": 2,
        "seed": 5,
        "logprobs": True,
        "top_logprobs": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, raw = await _post(edge, body)
    assert status == 200, raw
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_openai("CreateChatCompletionStreamResponse", chunk)
    for index in (0, 1):
        choices = [ch for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert "".join(ch["delta"].get("content") or "" for ch in choices) == "On it.\n"
        pieces = [p for ch in choices for p in ch["delta"].get("tool_calls") or []]
        assert pieces[0]["function"]["name"] == "get_weather" and pieces[0]["id"]
        arguments = "".join(p["function"].get("arguments", "") for p in pieces)
        assert json.loads(arguments) == {"city": "Oslo"}
        tokens = [e["token"] for ch in choices if ch["logprobs"] for e in ch["logprobs"]["content"]]
        assert tokens == list(CALL_WORDS)  # every token's, those of the call too
        assert choices[-1]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * len(CALL_WORDS)
    assert sorted(s.seed for s in source.samplings if s.seed is not None) == [5, 6]
    assert "<tools>" in source.prompts[0] and '"get_weather"' in source.prompts[0]


async def test_a_forced_call_sends_the_call_schema_and_grpc_returns_typed_calls(
    source: FakeSource, orchestrator: Orchestrator
) -> None:
    source.words = (' {"name": "get_weather", ', '"arguments": {"city": "Oslo"}}')
    tool = pb.Tool(name="get_weather", parameters=json.dumps(WEATHER["function"]["parameters"]))  # type: ignore[index]
    request = pb.GenerateRequest(
        model="agentic",
        chat=pb.Chat(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Oslo?")]),
        tools=[tool],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        response = await pb_grpc.GenerationServiceStub(channel).Generate(request)
    (call,) = response.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert response.finish_reason == pb.FINISH_REASON_TOOL_CALLS and not response.text
    structured = source.samplings[-1].structured
    assert structured is not None
    schema = json.loads(structured.schema)
    assert schema["properties"]["name"]["enum"] == ["get_weather"]
    assert schema["required"] == ["name", "arguments"]
