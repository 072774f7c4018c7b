"""The edge's side of tools, structured outputs, logprobs and n: OpenAI bodies → tokenrelay.v1,
and scripted orchestrator streams → OpenAI answers and SSE chunks, each validated against the
official schemas."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from _support import assert_openai
from tokenrelay.config import EdgeSettings
from tokenrelay.edge import _openai as oa
from tokenrelay.edge import _stream, create_app
from tokenrelay.edge._generate import OrchestratorClient
from tokenrelay.errors import InvalidRequest
from tokenrelay.v1 import generation_pb2 as pb

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_a_tool_request_becomes_typed_fields() -> None:
    parsed = oa.parse_chat(
        {
            "model": "m",
            "messages": CONVERSATION,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "logprobs": True,
            "top_logprobs": 3,
            "n": 2,
            "logit_bias": {"50256": -100, "7": 2.5},
        },
        "rid",
    )
    request = parsed.request
    (tool,) = request.tools
    assert (tool.name, tool.description) == ("get_weather", "The weather in a city")
    assert json.loads(tool.parameters) == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert request.tool_choice == pb.ToolChoice(
        mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_weather"
    )
    assert request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    assert [m.role for m in request.chat.messages] == [
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
        pb.ROLE_TOOL,
    ]
    (call,) = request.chat.messages[1].tool_calls
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Paris"}')
    assert request.chat.messages[2].tool_call_id == "call_1"
    assert request.sampling.top_logprobs == 3 and parsed.logprobs
    assert parsed.n == 2 and dict(request.sampling.logit_bias) == {50256: -100.0, 7: 2.5}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = oa.parse_chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "A", "schema": schema, "strict": True},
            },
            "tool_choice": "required",
        },
        "rid",
    )
    assert parsed.request.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert json.loads(parsed.request.response_format.schema) == schema
    assert parsed.request.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert not parsed.logprobs and parsed.n == 1
    completion = oa.parse_completion({"model": "m", "prompt": "x", "logprobs": 2}, "rid")
    assert completion.request.sampling.top_logprobs == 2 and completion.logprobs


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat(tools={"a": 1}), "tools"),
        (_chat(tools=[{"type": "code"}]), "tools[0].type"),
        (_chat(tools=[{"type": "function"}]), "tools[0].function"),
        (_chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name"),
        (
            _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
            "tools[0].function.parameters",
        ),
        (_chat(tool_choice="always"), "tool_choice"),
        (_chat(tool_choice={"type": "function"}), "tool_choice.function"),
        (_chat(parallel_tool_calls="no"), "parallel_tool_calls"),
        (_chat(response_format={"type": "xml"}), "response_format"),
        (_chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (
            _chat(response_format={"type": "json_schema", "json_schema": {"schema": []}}),
            "response_format.json_schema.schema",
        ),
        (_chat(top_logprobs=2), "top_logprobs"),
        (_chat(logit_bias={"abc": 1}), "logit_bias"),
        (_chat(logit_bias={"²": 1}), "logit_bias"),
        (_chat(logit_bias={"5": "high"}), "logit_bias"),
        (_chat(logit_bias={"5": 10**400}), "logit_bias"),
        (_chat(n="two"), "n"),
        (
            _chat(messages=[{"role": "assistant", "content": "", "tool_calls": {}}]),
            "messages[0].tool_calls",
        ),
        (
            _chat(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": 3}}],
                    }
                ]
            ),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            _chat(messages=[{"role": "tool", "tool_call_id": 5, "content": "x"}]),
            "messages[0].tool_call_id",
        ),
    ],
)
def test_tool_fields_of_the_wrong_type_are_refused_by_name(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        oa.parse_chat(body, "rid")
    assert caught.value.param == param


def _start() -> pb.StreamStart:
    return pb.StreamStart(request_id="r1", served_by=pb.ServedBy(model="m", node="n:1"))


def _logprob(token: str) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token=token, logprob=-0.5, top_logprobs=[pb.Logprob(token=token, logprob=-0.5)]
    )


def _end(reason: int, tokens: int) -> pb.StreamEnd:
    return pb.StreamEnd(
        finish_reason=reason,  # type: ignore[arg-type]
        usage=pb.Usage(prompt_tokens=5, completion_tokens=tokens, total_tokens=5 + tokens),
    )


def _tool_stream() -> list[pb.GenerateStreamResponse]:
    """Two choices, interleaved: 0 calls a tool, 1 answers with text."""
    return [
        pb.GenerateStreamResponse(start=_start(), text="Let me look.", logprobs=[_logprob("Let")]),
        pb.GenerateStreamResponse(index=1, text="It is", logprobs=[_logprob("It")]),
        pb.GenerateStreamResponse(
            tool_calls=[pb.ToolCallDelta(index=0, id="call_a", name="get_weather", arguments="")]
        ),
        pb.GenerateStreamResponse(tool_calls=[pb.ToolCallDelta(index=0, arguments='{"city":')]),
        pb.GenerateStreamResponse(index=1, text=" sunny.", end=_end(pb.FINISH_REASON_STOP, 3)),
        pb.GenerateStreamResponse(
            tool_calls=[pb.ToolCallDelta(index=0, arguments=' "Paris"}')],
            end=_end(pb.FINISH_REASON_TOOL_CALLS, 9),
        ),
    ]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[pb.GenerateStreamResponse]]:
    script: list[pb.GenerateStreamResponse] = []

    async def stream(
        self: OrchestratorClient, request: Any, timeout_s: float, metadata: Any = ()
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        for message in script:
            yield message

    monkeypatch.setattr(OrchestratorClient, "stream", stream)
    yield script


async def _post(path: str, body: dict[str, Any]) -> tuple[int, str]:
    server = TestServer(create_app(EdgeSettings(orchestrator="127.0.0.1:9")), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as session, session.post(server.make_url(path), json=body) as r:
            return r.status, (await r.read()).decode()
    finally:
        await server.close()


def _events(raw: str) -> list[dict[str, Any]]:
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_a_streamed_answer_with_tool_calls_and_two_choices(
    scripted: list[pb.GenerateStreamResponse],
) -> None:
    scripted.extend(_tool_stream())
    body = _chat(
        n=2, logprobs=True, tools=[WEATHER], stream=True, stream_options={"include_usage": True}
    )
    status, raw = await _post("/v1/chat/completions", body)
    assert status == 200
    chunks = _events(raw)
    for chunk in chunks:
        assert_openai("CreateChatCompletionStreamResponse", chunk)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks[2:-1]:
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    calls = [d for c in by_index[0] for d in c["delta"].get("tool_calls", [])]
    # Pieces that arrive together may merge: the first has id, type and name, others do not.
    assert {k: calls[0][k] for k in ("index", "id", "type")} == {
        "index": 0,
        "id": "call_a",
        "type": "function",
    }
    assert calls[0]["function"]["name"] == "get_weather"
    assert all(set(d) == {"index", "function"} for d in calls[1:])  # arguments only, later
    assert "".join(d["function"]["arguments"] for d in calls) == '{"city": "Paris"}'
    assert [c["finish_reason"] for c in by_index[0]][-1] == "tool_calls"
    assert "".join(c["delta"].get("content") or "" for c in by_index[1]) == "It is sunny."
    assert by_index[1][-1]["finish_reason"] == "stop"
    assert by_index[0][0]["logprobs"]["content"][0]["token"] == "Let"
    assert by_index[0][0]["logprobs"]["content"][0]["bytes"] == list(b"Let")
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


async def test_a_whole_answer_with_tool_calls_and_two_choices(
    scripted: list[pb.GenerateStreamResponse],
) -> None:
    scripted.extend(_tool_stream())
    status, raw = await _post("/v1/chat/completions", _chat(n=2, logprobs=True, tools=[WEATHER]))
    assert status == 200, raw
    answer = json.loads(raw)
    assert_openai("CreateChatCompletionResponse", answer)
    first, second = answer["choices"]
    assert first["message"]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert first["message"]["content"] == "Let me look." and first["finish_reason"] == "tool_calls"
    assert second["message"] == {"role": "assistant", "content": "It is sunny.", "refusal": None}
    assert [e["token"] for e in second["logprobs"]["content"]] == ["It"]
    assert answer["usage"]["completion_tokens"] == 12


async def test_only_tool_calls_have_null_content(scripted: list[pb.GenerateStreamResponse]) -> None:
    scripted.extend(
        [
            pb.GenerateStreamResponse(
                start=_start(),
                tool_calls=[pb.ToolCallDelta(index=0, id="c", name="f", arguments="{}")],
                end=_end(pb.FINISH_REASON_TOOL_CALLS, 4),
            )
        ]
    )
    status, raw = await _post("/v1/chat/completions", _chat(tools=[WEATHER]))
    answer = json.loads(raw)
    assert status == 200
    assert_openai("CreateChatCompletionResponse", answer)
    assert answer["choices"][0]["message"]["content"] is None
    assert answer["choices"][0]["logprobs"] is None


async def test_completion_logprobs_streamed_and_not(
    scripted: list[pb.GenerateStreamResponse],
) -> None:
    scripted.extend(
        [
            pb.GenerateStreamResponse(
                start=_start(), text="ab", logprobs=[_logprob("a"), _logprob("b")]
            ),
            pb.GenerateStreamResponse(
                text="cd", logprobs=[_logprob("cd")], end=_end(pb.FINISH_REASON_LENGTH, 3)
            ),
        ]
    )
    status, raw = await _post("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 1})
    assert status == 200
    answer = json.loads(raw)
    assert_openai("CreateCompletionResponse", answer)
    assert answer["choices"][0]["logprobs"] == {
        "tokens": ["a", "b", "cd"],
        "token_logprobs": [-0.5, -0.5, -0.5],
        "top_logprobs": [{"a": -0.5}, {"b": -0.5}, {"cd": -0.5}],
        "text_offset": [0, 1, 2],
    }
    status, raw = await _post(
        "/v1/completions", {"model": "m", "prompt": "x", "logprobs": 1, "stream": True}
    )
    assert status == 200
    chunks = _events(raw)
    offsets = [
        o
        for c in chunks
        if c["choices"][0]["logprobs"]
        for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == [0, 1, 2]  # counted over the whole text, across chunks
    for chunk in chunks:
        if chunk["choices"][0]["finish_reason"] is None:  # see test_openai_sdk: the one deviation
            chunk["choices"][0]["finish_reason"] = "length"
        assert_openai("CreateCompletionResponse", chunk)


def _length_end(prompt: int, completion: int, continued_prompt: int = 0) -> pb.StreamEnd:
    end = pb.StreamEnd(
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=prompt, completion_tokens=completion),
    )
    if continued_prompt:
        end.continued.count = 1
        end.continued.usage.prompt_tokens = continued_prompt
        end.continued.usage.completion_tokens = 4
    return end


@pytest.mark.parametrize("continued_first", [True, False])
def test_the_usage_of_n_choices_counts_the_prompt_once_and_every_continuation(
    continued_first: bool,
) -> None:
    # Choice 0 was continued (its end counts the prompt 4 and the continuation's prompt 8).
    ends = [_length_end(12, 8, continued_prompt=8), _length_end(4, 8)]
    if not continued_first:
        ends.reverse()
    usage = _stream.total_usage(ends)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 16, 28)
    continued = _stream.continued_of(ends)
    assert continued is not None and continued.count == 1
    assert continued.usage.prompt_tokens == 8
