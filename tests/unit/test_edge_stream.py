"""The edge's SSE writer over a scripted orchestrator stream: messages that pile up while the
edge is busy go out as one event, with the text intact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from _support import assert_openai
from tokenrelay.config import EdgeSettings, Resume
from tokenrelay.edge import create_app
from tokenrelay.edge._generate import OrchestratorClient
from tokenrelay.v1 import generation_pb2 as pb


def _messages(texts: list[str]) -> list[pb.GenerateStreamResponse]:
    start = pb.StreamStart(request_id="r1", served_by=pb.ServedBy(model="synthetic", node="n:1"))
    messages = [pb.GenerateStreamResponse(start=start, text=texts[0])]
    messages += [pb.GenerateStreamResponse(text=t) for t in texts[1:]]
    messages[-1].end.finish_reason = pb.FINISH_REASON_STOP
    messages[-1].end.usage.completion_tokens = len(texts)
    return messages


async def test_messages_that_arrive_together_go_out_as_one_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = ["Hello", " there", ",", " how", " are", " you", "?"]

    async def stream(
        self: OrchestratorClient, request: Any, timeout_s: float, metadata: Any = ()
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        for message in _messages(texts):  # all at once: they are waiting when the edge reads
            yield message

    monkeypatch.setattr(OrchestratorClient, "stream", stream)
    server = TestServer(create_app(EdgeSettings(orchestrator="127.0.0.1:9")), host="127.0.0.1")
    await server.start_server()
    try:
        body = {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            ClientSession() as session,
            session.post(server.make_url("/v1/chat/completions"), json=body) as response,
        ):
            assert response.status == 200
            raw = (await response.read()).decode()
    finally:
        await server.close()
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_openai("CreateChatCompletionStreamResponse", chunk)
    contents = [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    # The first message goes out alone, as soon as it comes; the six that were waiting by the
    # time it was written go out as one event.
    assert contents == ["Hello", " there, how are you?"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(texts)


async def _fails_after_its_first_message(
    self: OrchestratorClient, request: Any, timeout_s: float, metadata: Any = ()
) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
    """The orchestrator's stream as the edge reads it, failing as a message that does not
    decode would (not a relay error)."""
    yield _messages(["Hello", " there"])[0]
    raise ValueError("Error parsing message")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_an_unexpected_failure_mid_stream_ends_it_with_an_error_event(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # A failure other than the relay's own (here a message that does not decode) used to reach
    # the error middleware, whose 500 response went out inside the 200's chunked body, and the
    # client waited on a stream that never ended.
    monkeypatch.setattr(OrchestratorClient, "stream", _fails_after_its_first_message)
    settings = EdgeSettings(orchestrator="127.0.0.1:9", resume=Resume(grace_s=0))  # not resumable
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        body: dict[str, Any] = {"model": "synthetic", "stream": True}
        body |= (
            {"prompt": "hi"}
            if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}]}
        )
        async with (
            ClientSession() as session,
            session.post(server.make_url(path), json=body) as response,
        ):
            assert response.status == 200
            raw = (await asyncio.wait_for(response.read(), 10)).decode()
    finally:
        await server.close()
    assert "HTTP/1.1" not in raw
    error = raw.split("event: error\ndata: ", 1)[1].split("\n\n", 1)[0]
    assert json.loads(error)["error"]["message"] == "Internal error."
    assert "Error parsing" not in raw


async def test_an_unexpected_failure_of_a_websocket_generation_reaches_its_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(OrchestratorClient, "stream", _fails_after_its_first_message)
    server = TestServer(create_app(EdgeSettings(orchestrator="127.0.0.1:9")), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as session, session.ws_connect(server.make_url("/v1/ws")) as ws:
            body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
            await ws.send_json({"type": "chat.completions.create", "id": "g", "body": body})
            kinds = []
            while not kinds or kinds[-1]["type"] == "chunk":
                kinds.append(json.loads((await asyncio.wait_for(ws.receive(), 5)).data))
    finally:
        await server.close()
    assert kinds[-1]["type"] == "error" and kinds[-1]["id"] == "g"
    assert kinds[-1]["error"]["message"] == "Internal error."
