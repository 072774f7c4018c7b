"""Tools, structured outputs, logprobs and n on the running stack, driven by the clients agents
use: the openai SDK, LiteLLM, Google ADK and a gRPC client. The synthetic model gives the
deterministic agent loop (it calls a tool when offered one, and answers from the result);
SmolLM2 is forced to well-formed calls and JSON by constrained decoding — on any backend: its
tests are marked ``any_backend`` (``_support.target``: Triton's vLLM model constrains with its own
grammar backends)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import httpx
import jsonschema
import openai
import pydantic
import pytest

from _support import assert_openai, triton_metric
from _support.target import MODELS, StackUnderTest
from tokenrelay.stack import Stack
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

# LiteLLM fetches a model cost map from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

SMOL = MODELS.chat
ANY = pytest.mark.any_backend
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]


def _sse(response: httpx.Response) -> list[dict[str, Any]]:
    payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        assert_openai("CreateChatCompletionStreamResponse", chunk)
    return chunks


def _streamed_calls(chunks: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """The tool calls of a stream, put together as an OpenAI client does; checks that a call's
    first piece names it and later pieces only add arguments."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for piece in choice["delta"].get("tool_calls") or []:
                if piece["index"] not in calls:
                    assert piece["id"] and piece["type"] == "function", piece
                    calls[piece["index"]] = {
                        "id": piece["id"],
                        "name": piece["function"]["name"],
                        "arguments": "",
                    }
                else:
                    assert "id" not in piece and "name" not in piece["function"], piece
                calls[piece["index"]]["arguments"] += piece["function"].get("arguments", "")
    return calls


def _models_requests(stack: Stack) -> float:
    """Every request the Triton models saw, whatever became of it."""
    return sum(
        triton_metric(
            stack.triton_metrics_url, "tokenrelay_model_requests_total", model=m, outcome=o
        )
        for m in ("smollm2", "synthetic")
        for o in ("completed", "cancelled", "failed", "rejected")
    )


# --- the synthetic model: the deterministic agent loop ------------------------------------------


def test_a_tool_call_then_the_result_then_an_answer_that_uses_it(
    stack: Stack, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="synthetic", messages=ASK, tools=[TIME, WEATHER]
    )
    assert_openai("CreateChatCompletionResponse", json.loads(raw.http_response.text))
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    final = client.chat.completions.create(model="synthetic", messages=history, tools=[WEATHER])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == 'The tool said: {"forecast": "sunny"}.'
    assert not final.choices[0].message.tool_calls


def test_a_tool_call_streams_as_openai_streams_it(stack: Stack, client: openai.OpenAI) -> None:
    body = {
        "model": "synthetic",
        "messages": ASK,
        "tools": [WEATHER],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{stack.edge_url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        chunks = _sse(r)
    calls = _streamed_calls(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMETERS)
    pieces = [p for c in chunks for ch in c["choices"] for p in ch["delta"].get("tool_calls") or []]
    assert len(pieces) > 2  # the arguments came in pieces, as the model wrote them
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 2
    # The same through the SDK's stream, accumulated as an agent would.
    names, arguments = [], ""
    for chunk in client.chat.completions.create(
        model="synthetic", messages=ASK, tools=[WEATHER], stream=True
    ):
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if piece.function and piece.function.name:
                names.append(piece.function.name)
            arguments += (piece.function.arguments or "") if piece.function else ""
    assert names == ["get_weather"] and json.loads(arguments) == json.loads(calls[0]["arguments"])


def test_n_choices_have_their_own_seeds_and_summed_usage(
    stack: Stack, client: openai.OpenAI
) -> None:
    question = [{"role": "user", "content": "Say something."}]
    completion = client.chat.completions.create(
        model="synthetic", messages=question, n=3, max_tokens=6, seed=7
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) == 3  # seeds 7, 8, 9
    alone = client.chat.completions.create(
        model="synthetic", messages=question, max_tokens=6, seed=8
    )
    assert alone.choices[0].message.content == texts[1]  # choice 1 is seed + 1
    assert completion.usage is not None and completion.usage.completion_tokens == 18
    assert completion.usage.prompt_tokens == alone.usage.prompt_tokens  # type: ignore[union-attr]
    body = {"model": "synthetic", "messages": question, "n": 2, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{stack.edge_url}/v1/chat/completions", json=body, timeout=30) as r:
        chunks = _sse(r)
    indexes = {ch["index"] for c in chunks for ch in c["choices"]}
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert indexes == {0, 1} and finishes == ["length", "length"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_a_forced_call_on_the_synthetic_model(stack: Stack, choice: Any, stream: bool) -> None:
    body = {
        "model": "synthetic",
        "messages": [{"role": "user", "content": "What now?"}],  # names no tool
        "tools": [WEATHER, TIME],
        "tool_choice": choice,
        "stream": stream,
    }
    with httpx.stream("POST", f"{stack.edge_url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        if stream:
            calls = _streamed_calls(_sse(r))
        else:
            answer = json.loads(r.read())
            assert_openai("CreateChatCompletionResponse", answer)
            assert answer["choices"][0]["finish_reason"] == "tool_calls"
            calls = {
                i: {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for i, c in enumerate(answer["choices"][0]["message"]["tool_calls"])
            }
    # Constrained to one call: of the first tool for "required" (the minimal instance of the
    # calls' schema takes its first alternative), of the named one otherwise.
    (call,) = calls.values()
    assert call["name"] == ("get_weather" if choice == "required" else "get_time")
    schema = WEATHER_PARAMETERS if choice == "required" else TIME["function"]["parameters"]  # type: ignore[index]
    jsonschema.validate(json.loads(call["arguments"]), schema)


def test_a_json_schema_answer_on_the_synthetic_model(client: openai.OpenAI) -> None:
    class Point(pydantic.BaseModel):
        x: int
        label: str

    completion = client.beta.chat.completions.parse(
        model="synthetic", messages=[{"role": "user", "content": "A point."}], response_format=Point
    )
    assert completion.choices[0].message.parsed == Point(x=0, label="")


def test_logprobs_on_the_synthetic_model_are_those_of_its_uniform_choice(
    stack: Stack, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="synthetic",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=5,
        seed=2,
        logprobs=True,
        top_logprobs=3,
    )
    assert_openai("CreateChatCompletionResponse", json.loads(raw.http_response.text))
    choice = raw.parse().choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert "".join(e.token for e in content) == choice.message.content
    for entry in content:
        assert entry.logprob == pytest.approx(-math.log(23), abs=1e-6)
        # All 23 words are tied: the three shown are the drawn one and two others.
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())
    body = {
        "model": "synthetic",
        "prompt": "one two",
        "max_tokens": 4,
        "logprobs": 1,
        "stream": True,
    }
    with httpx.stream("POST", f"{stack.edge_url}/v1/completions", json=body, timeout=30) as r:
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    entries = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert "".join(t for e in entries for t in e["tokens"]) == text
    offsets = [o for e in entries for o in e["text_offset"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)


# --- bad input: 400 naming the field, and nothing reaches Triton --------------------------------

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}
BAD = [
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "strang"}}},
                    },
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"$ref": "http://example.com/s"}},
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
        "tools[0].function.name",
    ),
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}]},
        "messages[1].tool_call_id",
    ),
    ({"model": SMOL, "response_format": SCHEMA_FORMAT}, "response_format.json_schema.schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema.schema",
    ),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logit_bias": {"42": 5}}, "logit_bias"),  # the synthetic model applies none
    ({"n": 17}, "n"),
]


@pytest.mark.parametrize(("changes", "param"), BAD)
def test_bad_tool_requests_are_refused_by_name_before_any_model_time(
    stack: Stack, changes: dict[str, Any], param: str
) -> None:
    before = _models_requests(stack)
    body = {"model": "synthetic", "messages": ASK, **changes}
    response = httpx.post(f"{stack.edge_url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()
    assert_openai("ErrorResponse", error)
    assert error["error"]["param"] == param
    assert _models_requests(stack) == before


# --- gRPC: the same, typed ----------------------------------------------------------------------


@pytest.fixture
def stub(stack: Stack) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def test_grpc_tool_calls_are_typed(stub: pb_grpc.GenerationServiceStub) -> None:
    tool = pb.Tool(
        name="get_weather", description="Weather", parameters=json.dumps(WEATHER_PARAMETERS)
    )
    question = pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris? get_weather")
    request = pb.GenerateStreamRequest(
        model="synthetic", chat=pb.Chat(messages=[question]), tools=[tool]
    )
    messages = list(stub.GenerateStream(request, timeout=30))
    pieces = [p for m in messages for p in m.tool_calls]
    assert pieces[0].id and pieces[0].name == "get_weather" and pieces[0].index == 0
    assert all(not p.id and not p.name for p in pieces[1:])
    arguments = "".join(p.arguments for p in pieces)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    assert messages[-1].end.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert not "".join(m.text for m in messages)
    unary = stub.Generate(
        pb.GenerateRequest(model="synthetic", chat=pb.Chat(messages=[question]), tools=[tool]),
        timeout=30,
    )
    (call,) = unary.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == json.loads(arguments)
    assert unary.finish_reason == pb.FINISH_REASON_TOOL_CALLS and unary.choices[0].tool_calls
    answered = pb.GenerateRequest(
        model="synthetic",
        chat=pb.Chat(
            messages=[
                question,
                pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id=call.id, content="22 C, sunny"),
            ]
        ),
        tools=[tool],
    )
    final = stub.Generate(answered, timeout=30)
    assert final.text == "The tool said: 22 C, sunny." and not final.tool_calls
    assert final.finish_reason == pb.FINISH_REASON_STOP
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(
            pb.GenerateRequest(
                model="synthetic",
                chat=pb.Chat(
                    messages=[question, pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id="x")]
                ),
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_grpc_lists_what_each_model_can_do(stub: pb_grpc.GenerationServiceStub) -> None:
    models = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
    assert models["synthetic"].capabilities == pb.Capabilities(
        tool_parser="hermes", structured_outputs=True, logprobs=True
    )
    assert models[SMOL].capabilities == pb.Capabilities(
        tool_parser="hermes", structured_outputs=True, logprobs=True, logit_bias=True
    )


# --- LiteLLM and Google ADK --------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _quiet(test: F) -> F:
    """Third-party import-time noise (pydantic, google-genai) is not ours to fail on."""
    for category in ("Deprecation", "PendingDeprecation", "User", "Resource"):
        test = pytest.mark.filterwarnings(f"ignore::{category}Warning")(test)
    return test


@_quiet
@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
@pytest.mark.parametrize("stream", [False, True])
async def test_litellm_tool_round_trip(stack: Stack, provider: str, stream: bool) -> None:
    import litellm

    common = {
        "model": f"{provider}/synthetic",
        "api_base": f"{stack.edge_url}/v1",
        "api_key": "unused",
        "tools": [WEATHER],
    }
    if stream:
        chunks = [c async for c in await litellm.acompletion(**common, messages=ASK, stream=True)]
        message = litellm.stream_chunk_builder(chunks, messages=ASK).choices[0].message
    else:
        message = (await litellm.acompletion(**common, messages=ASK)).choices[0].message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "rain"},
    ]
    final = await litellm.acompletion(**common, messages=history)
    assert final.choices[0].message.content == "The tool said: rain."


async def _run_agent(
    stack: StackUnderTest,
    model: str,
    provider: str,
    streaming: bool,
    force_first: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """An ADK agent with one real Python function; returns the function's calls and the final
    answer. ``force_first``: the first model turn must call a tool (tool_choice required),
    later ones may not (so the agent ends with an answer)."""
    from google.adk.agents import LlmAgent
    from google.adk.agents.run_config import RunConfig, StreamingMode
    from google.adk.models.lite_llm import LiteLlm
    from google.adk.runners import Runner
    from google.adk.sessions import InMemorySessionService
    from google.genai import types

    calls: list[dict[str, Any]] = []

    def get_weather(city: str) -> dict[str, str]:
        """The current weather in a city."""
        calls.append({"city": city})
        return {"city": city, "forecast": "sunny with a light breeze"}

    def force(callback_context: Any, llm_request: Any) -> None:
        answered = any(
            part.function_response for content in llm_request.contents for part in content.parts
        )
        mode = (
            types.FunctionCallingConfigMode.NONE
            if answered
            else types.FunctionCallingConfigMode.ANY
        )
        llm_request.config.tool_config = types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode=mode)
        )

    limits: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
    if temperature is not None:
        limits["temperature"] = temperature
    agent = LlmAgent(
        name="assistant",
        model=LiteLlm(
            model=f"{provider}/{model}", api_base=f"{stack.edge_url}/v1", api_key="x", **limits
        ),
        instruction="Answer the user's question; use the tools.",
        tools=[get_weather],
        before_model_callback=force if force_first else None,
    )
    sessions = InMemorySessionService()
    runner = Runner(agent=agent, app_name="tokenrelay", session_service=sessions)
    session = await sessions.create_session(app_name="tokenrelay", user_id="operator")
    final = []
    async for event in runner.run_async(
        user_id="operator",
        session_id=session.id,
        new_message=types.Content(
            role="user", parts=[types.Part(text="What is the weather in Paris? Use get_weather.")]
        ),
        run_config=RunConfig(
            streaming_mode=StreamingMode.SSE if streaming else StreamingMode.NONE,
            max_llm_calls=6,
        ),
    ):
        if event.is_final_response() and event.content:
            final.extend(p.text for p in event.content.parts if p.text)
    return calls, "".join(final)


@_quiet
@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
@pytest.mark.parametrize("streaming", [False, True])
async def test_adk_agent_calls_a_python_function_and_answers_from_it(
    stack: Stack, provider: str, streaming: bool
) -> None:
    calls, answer = await _run_agent(stack, "synthetic", provider, streaming)
    assert calls == [{"city": ""}]  # the synthetic model's minimal instance of the schema
    assert "sunny with a light breeze" in answer


# --- SmolLM2: constrained decoding (the CPU engine's grammars) ----------------------------------


@ANY
@pytest.mark.parametrize("stream", [False, True])
def test_smollm2_forced_to_call_returns_a_schema_valid_call(
    stack: StackUnderTest, client: openai.OpenAI, stream: bool
) -> None:
    body = {"model": SMOL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required"}
    if stream:
        with httpx.stream(
            "POST",
            f"{stack.edge_url}/v1/chat/completions",
            json={**body, "stream": True},
            timeout=60,
        ) as r:
            assert r.status_code == 200, r.read()
            calls = _streamed_calls(_sse(r))
        (call,) = calls.values()
        name, arguments = call["name"], call["arguments"]
    else:
        completion = client.chat.completions.create(**body)  # type: ignore[call-overload]
        assert completion.choices[0].finish_reason == "tool_calls"
        (tool_call,) = completion.choices[0].message.tool_calls
        name, arguments = tool_call.function.name, tool_call.function.arguments
    assert name in ("get_weather", "get_time")
    parameters = WEATHER_PARAMETERS if name == "get_weather" else TIME["function"]["parameters"]  # type: ignore[index]
    jsonschema.validate(json.loads(arguments), parameters)


@ANY
def test_smollm2_two_turns_a_named_call_then_an_answer(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=SMOL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    final = client.chat.completions.create(
        model=SMOL,
        messages=[
            *ASK,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "It is sunny in Paris."},
        ],
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=48,
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


@ANY
def test_smollm2_parses_into_a_pydantic_model(client: openai.OpenAI) -> None:
    # Greedy: sampled at temperature 1, SmolLM2-135M may ramble in the whitespace the JSON
    # grammar allows until max_tokens cuts the object short.
    completion = client.beta.chat.completions.parse(
        model=SMOL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=200,
        temperature=0,
    )
    city = completion.choices[0].message.parsed
    assert isinstance(city, City)
    # Any object: an open-ended question lets SmolLM2-135M add keys until max_tokens.
    loose = client.chat.completions.create(
        model=SMOL,
        messages=[
            {"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}
        ],
        response_format={"type": "json_object"},
        max_tokens=128,
        temperature=0,
    )
    assert loose.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)


@ANY
def test_smollm2_logprobs_streamed_and_not(stack: StackUnderTest, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=SMOL, messages=ASK, logprobs=True, top_logprobs=3, max_tokens=8, temperature=0
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == completion.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and 1 <= len(entry.top_logprobs) <= 3
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert entry.logprob == pytest.approx(ranked[0], abs=1e-4)  # greedy: the likeliest
    # Greedy: sampled, the model may end before 6 tokens (seen on the GPU: "not safe...").
    body = {
        "model": SMOL,
        "prompt": "The sea is",
        "logprobs": 2,
        "max_tokens": 6,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{stack.edge_url}/v1/completions", json=body, timeout=60) as r:
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(p) for p in payloads[:-1]]
    tokens = [
        t
        for c in chunks
        if c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["tokens"]
    ]
    assert len(tokens) == 6


@ANY
@_quiet
@pytest.mark.timeout(300)  # two SmolLM2 turns on a shared CPU, and litellm's import
async def test_smollm2_adk_agent_with_a_forced_first_call(stack: StackUnderTest) -> None:
    # Greedy, so that each run asks the same: sampled (no temperature, no seed), one CI run got
    # two calls of the function ([Paris, Paris]) where every other run got one.
    calls, answer = await _run_agent(
        stack, SMOL, "hosted_vllm", False, force_first=True, max_tokens=64, temperature=0
    )
    assert len(calls) == 1 and isinstance(calls[0]["city"], str)
    assert answer  # the second turn (no tools allowed) answered in text
