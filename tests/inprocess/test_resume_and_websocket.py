"""Resumable SSE (``edge/_stream.py``) and the WebSocket API (``edge/_ws.py``) in process: the
orchestrator on port 0 over a fake node, the edge as an aiohttp test server with API keys."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp import ClientSession, WSMsgType
from aiohttp.test_utils import TestServer

from _support import FakeSource, assert_openai
from tokenrelay.config import EdgeSettings, OrchestratorSettings, Resume, Settings, WebSocket
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.security import ApiKey, hash_key, new_key

ALICE, BOB, CAROL = new_key(), new_key(), new_key()  # Carol: one stream at a time
WORDS = tuple(f" w{i}" for i in range(40))
BODY = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
GRACE_S = 0.5

Edge = Callable[..., Awaitable[str]]


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource(words=WORDS, interval_s=0.02)


@pytest.fixture
async def orchestrator(source: FakeSource) -> AsyncIterator[Orchestrator]:
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=(source.name,), metrics_listen="127.0.0.1:0")
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    keys = (
        ApiKey("alice", sha256=hash_key(ALICE)),
        ApiKey("bob", sha256=hash_key(BOB)),
        ApiKey("carol", sha256=hash_key(CAROL), max_streams=1),
    )
    path = tmp_path / "keys.toml"
    entries = [{k: v for k, v in dataclasses.asdict(k).items() if v is not None} for k in keys]
    path.write_text(tomli_w.dumps({"keys": entries}))
    return path


@pytest.fixture
async def start_edge(orchestrator: Orchestrator, keys_file: Path) -> AsyncIterator[Edge]:
    servers: list[TestServer] = []

    async def start(**changes: Any) -> str:
        settings = EdgeSettings(
            orchestrator=f"127.0.0.1:{orchestrator.port}",
            api_keys_file=str(keys_file),
            keepalive_interval_s=1.0,
            resume=Resume(grace_s=GRACE_S),
            websocket=WebSocket(max_generations=2),
        )
        app = create_app(dataclasses.replace(settings, **changes))
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return str(server.make_url(""))

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def edge(start_edge: Edge) -> str:
    return await start_edge()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(text: str) -> list[dict[str, str]]:
    """SSE events as an EventSource parses them: id, event and data fields; comments ignored."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "data" in fields:
            events.append(fields)
    return events


def _text(events: list[dict[str, str]]) -> str:
    text = ""
    for event in events:
        if event["data"] != "[DONE]" and event.get("event") != "error":
            for choice in json.loads(event["data"])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


async def _read_some(response: aiohttp.ClientResponse, events: int) -> str:
    """Read the stream until ``events`` whole events have come."""
    got = ""
    while _events(got)[events - 1 : events] == [] or not got.endswith("\n\n"):
        got += (await response.content.readany()).decode()
    return got


async def test_a_dropped_stream_resumes_from_last_event_id_and_reads_as_one(
    edge: str, source: FakeSource
) -> None:
    async with ClientSession(headers=_auth(ALICE)) as http:
        async with http.post(f"{edge}/v1/chat/completions", json=BODY) as response:
            assert response.status == 200
            before = _events(await _read_some(response, 5))
        # The connection is gone; the generation goes on meanwhile.
        assert [int(e["id"]) for e in before] == list(range(1, len(before) + 1))
        stream_id = json.loads(before[0]["data"])["id"]
        assert stream_id.startswith("chatcmpl-") and len(stream_id) > 25
        await asyncio.sleep(0.2)  # away for a while: what it misses is generated meanwhile
        async with http.get(
            f"{edge}/v1/chat/completions/{stream_id}/stream",
            headers={"Last-Event-ID": before[-1]["id"]},
        ) as resumed:
            assert resumed.status == 200
            assert resumed.headers["Content-Type"].startswith("text/event-stream")
            after = _events(await resumed.text())
    assert int(after[0]["id"]) == int(before[-1]["id"]) + 1  # nothing missed, nothing twice
    assert after[-1]["data"] == "[DONE]"
    assert _text(before) + _text(after) == "".join(WORDS)
    for event in before + after[:-1]:
        assert_openai("CreateChatCompletionStreamResponse", json.loads(event["data"]))
    # The source's generator ends in the orchestrator a moment after its last chunk went out.
    await asyncio.wait_for(source.ended.wait(), 3)
    assert source.finished + source.cancelled == 1 and len(source.prompts) == 1


async def test_an_event_source_opening_the_stream_gets_it_from_the_start(edge: str) -> None:
    async with (
        ClientSession(headers=_auth(ALICE)) as http,
        http.post(f"{edge}/v1/chat/completions", json=BODY) as response,
    ):
        first = _events(await _read_some(response, 1))
        stream_id = json.loads(first[0]["data"])["id"]
        async with http.get(f"{edge}/v1/chat/completions/{stream_id}/stream") as taken:
            events = _events(await taken.text())
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.text()  # taken over: the first connection was cut
    assert _text(events) == "".join(WORDS) and events[-1]["data"] == "[DONE]"


async def test_resuming_a_wrong_id_another_key_or_too_late_is_a_clear_4xx(edge: str) -> None:
    async with ClientSession() as http:
        async with http.post(
            f"{edge}/v1/chat/completions", json=BODY, headers=_auth(ALICE)
        ) as response:
            first = _events(await _read_some(response, 2))
        stream_id = json.loads(first[0]["data"])["id"]
        url = f"{edge}/v1/chat/completions/{stream_id}/stream"
        cases = [
            (f"{edge}/v1/chat/completions/chatcmpl-nope/stream", ALICE, None, 404),
            (url, BOB, None, 403),
            (url, None, None, 401),
            (url, ALICE, "99999", 400),
            (url, ALICE, "not-a-number", 400),
        ]
        for where, key, last, status in cases:
            headers = {**(_auth(key) if key else {}), **({"Last-Event-ID": last} if last else {})}
            async with http.get(where, headers=headers) as refused:
                body = await refused.json()
            assert refused.status == status, (where, key, last, body)
            assert_openai("ErrorResponse", body)
        # Nobody resumed: cancelled and forgotten once the grace period is over. A timer, with
        # nothing to watch from outside: asking for the stream meanwhile would resume it.
        await asyncio.sleep(GRACE_S + 0.2)
        async with http.get(url, headers=_auth(ALICE)) as late:
            body = await late.json()
        assert late.status == 404 and body["error"]["code"] == "stream_not_found"
        assert "grace period" in body["error"]["message"]


async def test_a_stream_nobody_resumes_is_cancelled_at_the_node_after_its_grace(
    edge: str, source: FakeSource
) -> None:
    source.words = tuple(f" w{i}" for i in range(400))  # 8 s of words
    loop = asyncio.get_running_loop()
    async with (
        ClientSession(headers=_auth(ALICE)) as http,
        http.post(f"{edge}/v1/chat/completions", json=BODY) as response,
    ):
        await _read_some(response, 2)
    dropped = loop.time()
    await asyncio.sleep(GRACE_S / 2)
    assert not source.ended.is_set()  # still generating: the client may come back
    await asyncio.wait_for(source.ended.wait(), 3)
    assert GRACE_S <= loop.time() - dropped < GRACE_S + 1.0
    assert source.cancelled == 1 and source.finished == 0


async def test_a_client_that_is_done_cancels_its_stream_at_once(
    edge: str, source: FakeSource
) -> None:
    source.words = tuple(f" w{i}" for i in range(400))
    async with ClientSession(headers=_auth(ALICE)) as http:
        async with http.post(f"{edge}/v1/chat/completions", json=BODY) as response:
            first = _events(await _read_some(response, 2))
            stream_id = json.loads(first[0]["data"])["id"]
            async with http.post(f"{edge}/v1/chat/completions/{stream_id}/cancel") as cancel:
                assert cancel.status == 200 and (await cancel.json())["cancelled"] is True
            await asyncio.wait_for(source.ended.wait(), 1)
            assert "[DONE]" not in await response.text()  # the stream just ends
        async with http.post(f"{edge}/v1/chat/completions/{stream_id}/cancel") as again:
            assert again.status == 404


async def test_a_dropped_stream_still_generating_counts_against_its_keys_max_streams(
    start_edge: Edge, source: FakeSource
) -> None:
    # The lease went back when the first connection's handler returned: a client dropping and
    # asking again ran more generations at once than its max_streams.
    edge = await start_edge(resume=Resume(grace_s=5.0))
    source.words = tuple(f" w{i}" for i in range(400))
    async with ClientSession(headers=_auth(CAROL)) as http:
        async with http.post(f"{edge}/v1/chat/completions", json=BODY) as response:
            stream_id = json.loads(_events(await _read_some(response, 1))[0]["data"])["id"]
        async with http.post(f"{edge}/v1/chat/completions", json=BODY) as again:
            assert again.status == 429  # the first still generates, waiting to be resumed
        resume = f"{edge}/v1/chat/completions/{stream_id}/stream"
        async with http.get(resume, headers={"Last-Event-ID": "1"}) as resumed:
            assert resumed.status == 200  # its own stream: under the lease it holds
            assert _events(await _read_some(resumed, 1))[0]["id"] == "2"
        async with http.post(f"{edge}/v1/chat/completions/{stream_id}/cancel") as cancel:
            assert cancel.status == 200
        await asyncio.wait_for(source.ended.wait(), 1)
        for _ in range(50):  # its lease is given back as its generation ends
            async with http.post(f"{edge}/v1/chat/completions", json=BODY) as after:
                if after.status == 200:
                    break
            await asyncio.sleep(0.02)
        assert after.status == 200


async def test_a_resume_past_the_replay_buffer_is_410(start_edge: Edge, source: FakeSource) -> None:
    edge = await start_edge(resume=Resume(grace_s=5.0, buffer_bytes=2000))
    async with ClientSession(headers=_auth(ALICE)) as http:
        async with http.post(f"{edge}/v1/chat/completions", json=BODY) as response:
            first = _events(await _read_some(response, 1))
        await asyncio.wait_for(source.ended.wait(), 3)  # the answer ended meanwhile
        stream_id = json.loads(first[0]["data"])["id"]
        url = f"{edge}/v1/chat/completions/{stream_id}/stream"
        async with http.get(url, headers={"Last-Event-ID": "1"}) as gone:
            body = await gone.json()
        assert gone.status == 410 and body["error"]["code"] == "stream_events_dropped"
        assert_openai("ErrorResponse", body)
        async with http.get(url, headers={"Last-Event-ID": "40"}) as recent:
            assert recent.status == 200  # the buffer's most recent events are still there
            assert (await recent.text()).endswith("data: [DONE]\n\n")


async def test_without_a_grace_period_events_have_no_ids_and_a_drop_cancels_at_once(
    start_edge: Edge, source: FakeSource
) -> None:
    edge = await start_edge(resume=Resume(grace_s=0))
    source.words = tuple(f" w{i}" for i in range(400))
    async with (
        ClientSession(headers=_auth(ALICE)) as http,
        http.post(f"{edge}/v1/chat/completions", json=BODY) as response,
    ):
        events = _events(await _read_some(response, 2))
    assert all("id" not in e for e in events)
    await asyncio.wait_for(source.ended.wait(), 1)
    assert source.cancelled == 1


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), 5)
    assert message.type is WSMsgType.TEXT, message
    parsed: dict[str, Any] = json.loads(message.data)
    return parsed


def _create(generation_id: str, **body: Any) -> dict[str, Any]:
    chat = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], **body}
    return {"type": "chat.completions.create", "id": generation_id, "body": chat}


async def test_two_generations_on_one_socket_and_a_cancel(edge: str, source: FakeSource) -> None:
    source.words = tuple(f" w{i}" for i in range(100))
    async with (
        ClientSession() as http,
        http.ws_connect(f"{edge}/v1/ws", headers=_auth(ALICE)) as ws,
    ):
        await ws.send_json(_create("a", max_tokens=100))
        await ws.send_json(_create("b", max_tokens=30, stream_options={"include_usage": True}))
        texts: dict[str, str] = {"a": "", "b": ""}
        ends: dict[str, dict[str, Any]] = {}
        cancelled = False
        while "b" not in ends or "a" not in ends:
            message = await _receive(ws)
            if message["type"] == "chunk":
                assert_openai("CreateChatCompletionStreamResponse", message["data"])
                for choice in message["data"]["choices"]:
                    texts[message["id"]] += choice["delta"].get("content") or ""
                if message["id"] == "a" and len(texts["a"].split()) >= 5 and not cancelled:
                    await ws.send_json({"type": "cancel", "id": "a"})
                    cancelled = True
                if message["data"].get("usage"):
                    ends.setdefault("usage", message["data"]["usage"])
            else:
                assert message["type"] == "done", message
                ends[message["id"]] = message
        assert ends["a"].get("cancelled") is True and "cancelled" not in ends["b"]
        assert texts["b"] == "".join(source.words[:30])
        assert 5 <= len(texts["a"].split()) < 100
        assert ends["usage"]["completion_tokens"] == 30
    assert source.cancelled >= 1 and len(source.prompts) == 2


async def test_bad_messages_get_errors_and_the_socket_stays_usable(edge: str) -> None:
    async with (
        ClientSession() as http,
        http.ws_connect(f"{edge}/v1/ws", headers=_auth(ALICE)) as ws,
    ):
        bad = [
            "{not json",
            "[1, 2]",
            json.dumps({"type": "nonsense", "id": "x"}),
            json.dumps({"type": "chat.completions.create", "body": {}}),
            json.dumps({"type": "cancel", "id": "never-started"}),
            json.dumps(_create("m", max_tokens=0)),
            json.dumps(_create("n", model="no-such-model")),
        ]
        for text in bad:
            await ws.send_str(text)
            message = await _receive(ws)
            assert message["type"] == "error", (text, message)
            assert_openai("ErrorResponse", {"error": message["error"]})
        await ws.send_bytes(b"\x00\x01")
        assert (await _receive(ws))["type"] == "error"
        await ws.send_json(_create("ok", max_tokens=3))  # and it still works
        text = ""
        while (message := await _receive(ws))["type"] == "chunk":
            text += message["data"]["choices"][0]["delta"].get("content") or ""
        assert message == {"type": "done", "id": "ok"} and text == "".join(WORDS[:3])


async def test_an_oversize_message_closes_the_socket_with_1009(start_edge: Edge) -> None:
    edge = await start_edge(max_body_bytes=4096)
    async with (
        ClientSession() as http,
        http.ws_connect(f"{edge}/v1/ws", headers=_auth(ALICE)) as ws,
    ):
        await ws.send_json(_create("big", messages=[{"role": "user", "content": "x" * 8000}]))
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert ws.close_code == 1009


async def test_a_browser_authenticates_with_its_first_message(edge: str) -> None:
    async with ClientSession() as http:
        async with http.ws_connect(f"{edge}/v1/ws") as ws:
            await ws.send_json({"type": "auth", "api_key": ALICE})
            await ws.send_json(_create("a", max_tokens=2))
            assert (await _receive(ws))["type"] == "chunk"
        async with http.ws_connect(f"{edge}/v1/ws") as ws:
            await ws.send_json({"type": "auth", "api_key": "wrong"})
            error = await _receive(ws)
            assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key"
            closed = await asyncio.wait_for(ws.receive(), 5)
            assert closed.type is WSMsgType.CLOSE and ws.close_code == 1008
        async with http.ws_connect(f"{edge}/v1/ws") as ws:
            await ws.send_json(_create("a"))  # no auth message first
            assert (await _receive(ws))["type"] == "error"
            await asyncio.wait_for(ws.receive(), 5)
            assert ws.close_code == 1008
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{edge}/v1/ws", headers=_auth("wrong"))
        assert refused.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
            await http.ws_connect(f"{edge}/v1/ws", headers={"Origin": "https://evil.example"})
        assert foreign.value.status == 403


async def test_a_socket_runs_at_most_max_generations_at_once(edge: str, source: FakeSource) -> None:
    source.words = tuple(f" w{i}" for i in range(100))
    async with (
        ClientSession() as http,
        http.ws_connect(f"{edge}/v1/ws", headers=_auth(ALICE)) as ws,
    ):
        for generation_id in ("a", "b", "c"):
            await ws.send_json(_create(generation_id))
        while True:
            message = await _receive(ws)
            if message["type"] == "error":
                break
        assert message["id"] == "c" and message["error"]["type"] == "rate_limit_error"
        await ws.send_json(_create("a"))  # a running id is refused too
        while (message := await _receive(ws))["type"] != "error":
            pass
        assert message["id"] == "a" and "running" in message["error"]["message"]
