"""Streams that outlive their connection, and the WebSocket API, on real processes: a stack of its
own (tritonserver with the synthetic model, orchestrator, edge with two API keys and a short
resume grace), shared by this module's tests (none of them breaks it)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import tomli_w

from _support import REPO, assert_openai, eventually, triton_metric
from tokenrelay.config import EdgeSettings, ModelSpec, Resume, Settings, WebSocket, to_toml
from tokenrelay.security import ApiKey, hash_key, new_key
from tokenrelay.stack import Stack, StackPorts

ALICE, BOB = new_key(), new_key()
GRACE_S = 2.0
CANCELLED = "tokenrelay_model_requests_total"
CHAT = {
    "model": "synthetic",
    "messages": [{"role": "user", "content": "tell me a story"}],
    "max_tokens": 60,
    "seed": 5,
    "stream": True,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("streams")
    keys = workdir / "keys.toml"
    entries = [
        {k: v for k, v in dataclasses.asdict(key).items() if v is not None}
        for key in (ApiKey("alice", sha256=hash_key(ALICE)), ApiKey("bob", sha256=hash_key(BOB)))
    ]
    keys.write_text(tomli_w.dumps({"keys": entries}))
    settings = Settings(
        edge=EdgeSettings(
            api_keys_file=str(keys),
            resume=Resume(grace_s=GRACE_S),
            websocket=WebSocket(max_generations=4),
            max_body_bytes=64 * 1024,
        ),
        models=(ModelSpec("synthetic", "synthetic", context_window=4096),),
    )
    config = workdir / "tokenrelay.toml"
    config.write_text(to_toml(settings))
    with Stack(
        REPO / "triton_models",
        StackPorts.free(),
        models=("synthetic",),
        config=config,
        fast_stop=True,
    ) as running:
        yield running


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(text: str) -> list[dict[str, str]]:
    """SSE events as an EventSource parses them (id, event, data); comments left out."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(
            line.partition(": ")[::2] for line in block.split("\n") if line[:1] not in ("", ":")
        )
        if "data" in fields:
            events.append(fields)
    return events


def _text(events: list[dict[str, str]]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if event["data"] != "[DONE]" and event.get("event") != "error"
        for choice in json.loads(event["data"])["choices"]
    )


async def _uninterrupted(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
        events = _events(await response.text())
    assert events[-1]["data"] == "[DONE]"
    return _text(events)


async def _first_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, str]]:
    got = ""
    while len(_events(got)) < count or not got.endswith("\n\n"):
        got += (await response.content.readany()).decode()
    return _events(got)


async def test_an_event_source_resumes_a_dropped_stream_and_reads_the_same_answer(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession(headers=_auth(ALICE)) as http:
        expected = await _uninterrupted(http, stack.edge_url)
        async with http.post(f"{stack.edge_url}/v1/chat/completions", json=CHAT) as response:
            before = await _first_events(response, 6)
            # Leaving the block drops the TCP connection mid-stream, as a network blip does.
        stream_id = json.loads(before[0]["data"])["id"]
        await asyncio.sleep(0.3)  # the generation goes on meanwhile
        resume = f"{stack.edge_url}/v1/chat/completions/{stream_id}/stream"
        async with http.get(resume, headers={"Last-Event-ID": before[-1]["id"]}) as resumed:
            assert resumed.status == 200
            after = _events(await resumed.text())
    assert int(after[0]["id"]) == int(before[-1]["id"]) + 1
    assert after[-1]["data"] == "[DONE]"
    assert _text(before) + _text(after) == expected
    for event in before + after[:-1]:
        assert_openai("CreateChatCompletionStreamResponse", json.loads(event["data"]))


async def test_resume_with_a_wrong_id_another_key_or_after_the_grace_is_a_clear_4xx(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{stack.edge_url}/v1/chat/completions",
            json={**CHAT, "max_tokens": 2000},  # 40 s of words: still running when resumed
            headers=_auth(ALICE),
        ) as response:
            before = await _first_events(response, 3)
        stream_id = json.loads(before[0]["data"])["id"]
        resume = f"{stack.edge_url}/v1/chat/completions/{stream_id}/stream"
        cancelled = triton_metric(stack.triton_metrics_url, CANCELLED, outcome="cancelled")
        for url, key, status in (
            (f"{stack.edge_url}/v1/chat/completions/chatcmpl-guess/stream", ALICE, 404),
            (resume, BOB, 403),
        ):
            async with http.get(url, headers=_auth(key)) as refused:
                body = await refused.json()
            assert refused.status == status, body
            assert_openai("ErrorResponse", body)
        dropped = time.monotonic()
        # Nobody resumes: once the grace is over, Triton counts the request cancelled ...
        assert await eventually(
            lambda: (
                triton_metric(stack.triton_metrics_url, CANCELLED, outcome="cancelled") > cancelled
            ),
            timeout_s=GRACE_S + 5,
        )
        assert time.monotonic() - dropped >= GRACE_S * 0.9
        # ... and the stream is gone.
        async with http.get(resume, headers=_auth(ALICE)) as late:
            body = await late.json()
        assert late.status == 404 and body["error"]["code"] == "stream_not_found"


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    parsed: dict[str, Any] = json.loads(message.data)
    return parsed


def _create(generation_id: str, **body: Any) -> dict[str, Any]:
    chat = {k: v for k, v in CHAT.items() if k != "stream"}
    return {"type": "chat.completions.create", "id": generation_id, "body": {**chat, **body}}


async def test_two_generations_on_one_socket_one_cancelled_at_triton(stack: Stack) -> None:
    metrics = stack.triton_metrics_url
    cancelled = triton_metric(metrics, CANCELLED, outcome="cancelled")
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{stack.edge_url}/v1/ws") as ws,
    ):
        await ws.send_json({"type": "auth", "api_key": ALICE})  # as a browser does
        await ws.send_json(_create("long", max_tokens=1000))
        await ws.send_json(_create("short", max_tokens=40))
        texts = {"long": "", "short": ""}
        done: dict[str, dict[str, Any]] = {}
        while len(done) < 2:
            message = await _receive(ws)
            if message["type"] == "chunk":
                assert_openai("CreateChatCompletionStreamResponse", message["data"])
                for choice in message["data"]["choices"]:
                    texts[message["id"]] += choice["delta"].get("content") or ""
                if message["id"] == "long" and len(texts["long"].split()) == 5:
                    await ws.send_json({"type": "cancel", "id": "long"})
            else:
                assert message["type"] == "done", message
                done[message["id"]] = message
    assert done["long"]["cancelled"] is True and len(texts["long"].split()) < 1000
    assert len(texts["short"].split()) == 40 and "cancelled" not in done["short"]
    assert await eventually(
        lambda: triton_metric(metrics, CANCELLED, outcome="cancelled") == cancelled + 1
    ), "Triton did not count the cancellation"


async def test_bad_frames_get_errors_the_socket_stays_usable_and_oversize_ones_close_it(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{stack.edge_url}/v1/ws", headers=_auth(BOB)) as ws:
            for bad in ("{oops", json.dumps({"type": "create", "id": "x"}), json.dumps([1])):
                await ws.send_str(bad)
                message = await _receive(ws)
                assert message["type"] == "error"
                assert_openai("ErrorResponse", {"error": message["error"]})
            await ws.send_json(_create("after", max_tokens=3))
            while (message := await _receive(ws))["type"] == "chunk":
                pass
            assert message == {"type": "done", "id": "after"}
            await ws.send_json(
                _create("huge", messages=[{"role": "user", "content": "x" * 70_000}])
            )
            closed = await asyncio.wait_for(ws.receive(), 10)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009  # message too big
        async with http.ws_connect(f"{stack.edge_url}/v1/ws") as ws:
            await ws.send_json({"type": "auth", "api_key": "not-a-key"})
            assert (await _receive(ws))["error"]["code"] == "invalid_api_key"
            await asyncio.wait_for(ws.receive(), 10)
        assert ws.close_code == 1008  # policy violation: unauthenticated
