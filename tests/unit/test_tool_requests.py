"""Tools, response formats, logprobs and n in the orchestrator: validation names the field,
plans constrain forced calls and JSON answers, the relay parses tool calls and fans choices out,
and the Triton adapter decodes the vLLM backend's logprobs."""

from __future__ import annotations

import asyncio
import json
import threading

import jsonschema
import pytest

from _support import FakeSource, Ordered, eventually, relay_for
from tokenrelay.config import Limits, ModelSpec, OrchestratorSettings, Settings
from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerationRequest,
    Logprob,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from tokenrelay.orchestrator._plan import Planner, validate
from tokenrelay.orchestrator._pool import NodePool, Placement
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.orchestrator._schemas import bounded
from tokenrelay.orchestrator._triton import _logprobs

CAPABLE = ModelSpec(id="m", triton_model="m", tool_parser="hermes")
PLAIN = ModelSpec(
    id="plain", triton_model="m", structured_outputs=False, logprobs=False, logit_bias=False
)
UNCONSTRAINED = ModelSpec(id="u", triton_model="m", tool_parser="hermes", structured_outputs=False)
WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
ASK = (ChatMessage(Role.USER, "Weather in Paris?"),)
CALL = ChatMessage(Role.ASSISTANT, "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),))


def _chat(messages: tuple[ChatMessage, ...] = ASK, **fields: object) -> GenerationRequest:
    return GenerationRequest(model="m", messages=messages, **fields)  # type: ignore[arg-type]


def _forced(name: str = "get_weather") -> ToolChoice:
    return ToolChoice(ToolChoiceMode.FUNCTION, name)


def _schema(schema: object) -> ResponseFormat:
    return ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(schema))


@pytest.mark.parametrize(
    ("spec", "request_", "param"),
    [
        (PLAIN, _chat(tools=(WEATHER,)), "tools"),
        (CAPABLE, GenerationRequest(model="m", prompt="x", tools=(WEATHER,)), "tools"),
        (CAPABLE, _chat(tool_choice=ToolChoice(ToolChoiceMode.REQUIRED)), "tool_choice"),
        (CAPABLE, _chat(tools=(WEATHER,), tool_choice=_forced("nope")), "tool_choice"),
        (CAPABLE, _chat(tools=(Tool("bad name"),)), "tools[0].function.name"),
        (CAPABLE, _chat(tools=(WEATHER, WEATHER)), "tools[1].function.name"),
        (CAPABLE, _chat(tools=(Tool("f", "", "{not json"),)), "tools[0].function.parameters"),
        (CAPABLE, _chat(tools=(Tool("f", "", "[1]"),)), "tools[0].function.parameters"),
        (
            CAPABLE,
            _chat(tools=(Tool("f", "", '{"type": "object", "properties": {"a": {"type": 5}}}'),)),
            "tools[0].function.parameters",
        ),
        (
            CAPABLE,
            _chat(tools=(Tool("f", "", '{"type": "string"}'),)),
            "tools[0].function.parameters",
        ),
        (
            CAPABLE,
            _chat(tools=(Tool("f", "", '{"$ref": "https://example.com/s.json"}'),)),
            "tools[0].function.parameters",
        ),
        (
            CAPABLE,
            _chat((*ASK, ChatMessage(Role.TOOL, "sunny", tool_call_id="call_9"))),
            "messages[1].tool_call_id",
        ),
        (CAPABLE, _chat((*ASK, CALL, ChatMessage(Role.TOOL, "sunny"))), "messages[2].tool_call_id"),
        (
            CAPABLE,
            _chat((ChatMessage(Role.USER, "x", tool_call_id="call_1"),)),
            "messages[0].tool_call_id",
        ),
        (
            CAPABLE,
            _chat((ChatMessage(Role.ASSISTANT, "", (ToolCall("", "f", "{}"),)),)),
            "messages[0].tool_calls[0].id",
        ),
        (PLAIN, _chat((*ASK, CALL)), "messages[1]"),
        (
            PLAIN,
            _chat(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)),
            "response_format",
        ),
        (
            CAPABLE,
            _chat(response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA)),
            "response_format.json_schema.schema",
        ),
        (
            CAPABLE,
            _chat(response_format=_schema({"type": "nothing"})),
            "response_format.json_schema.schema",
        ),
        (
            UNCONSTRAINED,
            _chat(tools=(WEATHER,), tool_choice=_forced()),
            "tool_choice",
        ),
        (
            CAPABLE,
            _chat(
                tools=(WEATHER,),
                tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
                response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT),
            ),
            "response_format",
        ),
        (PLAIN, _chat(sampling=Sampling(top_logprobs=2)), "logprobs"),
        (CAPABLE, _chat(sampling=Sampling(top_logprobs=21)), "top_logprobs"),
        (PLAIN, _chat(sampling=Sampling(logit_bias={5: 1.0})), "logit_bias"),
        (CAPABLE, _chat(sampling=Sampling(logit_bias={5: 101.0})), "logit_bias"),
        (CAPABLE, _chat(sampling=Sampling(logit_bias={-1: 1.0})), "logit_bias"),
        (CAPABLE, _chat(n=0), "n"),
        (CAPABLE, _chat(n=17), "n"),
    ],
)
def test_validation_names_the_field(
    spec: ModelSpec, request_: GenerationRequest, param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(request_, spec, Limits())
    assert caught.value.param == param, caught.value.message


def test_a_conversation_with_calls_and_their_results_is_valid() -> None:
    validate(
        _chat(
            (*ASK, CALL, ChatMessage(Role.TOOL, "sunny", tool_call_id="call_1")), tools=(WEATHER,)
        ),
        CAPABLE,
        Limits(),
    )


def _planner(*specs: ModelSpec) -> Planner:
    return Planner(specs or (CAPABLE,), Limits())


def test_a_forced_call_is_constrained_to_the_calls_schema_and_the_prompt_offers_the_tools() -> None:
    (plan,) = _planner().plans(_chat(tools=(WEATHER, Tool("now")), tool_choice=_forced()))
    structured = plan.request.sampling.structured
    assert structured is not None and plan.tools is not None and plan.tools.forced
    schema = json.loads(structured.schema)
    assert schema["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    arguments = schema["properties"]["arguments"]
    assert arguments["properties"]["city"] == {"type": "string", "maxLength": 128}  # bounded
    assert arguments["required"] == ["city"]
    assert "<tools>" in plan.prompt and '"name": "get_weather"' in plan.prompt
    engine = plan.request.sampling.to_engine_json()
    # As Triton's vLLM backend reads it: a JSON string of StructuredOutputsParams' fields.
    assert isinstance(engine["structured_outputs"], str)
    assert json.loads(engine["structured_outputs"]) == {"json": schema}
    (required,) = _planner().plans(
        _chat(tools=(WEATHER, Tool("now")), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED))
    )
    assert required.request.sampling.structured is not None
    assert len(json.loads(required.request.sampling.structured.schema)["anyOf"]) == 2


def test_tool_choice_none_hides_the_tools_and_auto_reads_calls_without_constraint() -> None:
    (none,) = _planner().plans(_chat(tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.NONE)))
    assert none.tools is None and "<tools>" not in none.prompt
    (auto,) = _planner().plans(_chat(tools=(WEATHER,)))
    assert auto.tools is not None and not auto.tools.forced
    assert auto.request.sampling.structured is None and "<tools>" in auto.prompt


def test_constraints_bound_what_the_schema_leaves_unbounded() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}},
            "many": {"type": "array", "minItems": 20},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "color": {"type": ["string", "null"], "enum": ["red", None]},
            "day": {"type": "string", "format": "date"},
            "note": {"type": "string", "maxLength": 1000, "default": "x"},
            "fixed": {"const": {"type": "array"}},  # data, not a schema: untouched
            "count": {"type": "integer"},
            "age": {"type": "integer", "minimum": 0},
            "huge": {"type": "integer", "exclusiveMinimum": 10**16},
            "pick": {"type": "integer", "enum": [1, 2]},
        },
    }
    out = bounded(schema)
    props = out["properties"]
    assert props["count"] == {"type": "integer", "maximum": 10**15 - 1, "minimum": -(10**15 - 1)}
    assert props["age"] == {"type": "integer", "minimum": 0, "maximum": 10**15 - 1}
    assert props["huge"]["maximum"] == 10**16 + 1 and "minimum" not in props["huge"]
    assert props["pick"] == {"type": "integer", "enum": [1, 2]}
    assert props["tags"] == {
        "type": "array",
        "items": {"type": "string", "maxLength": 128},
        "maxItems": 8,
    }
    assert props["many"]["maxItems"] == 20
    assert props["code"] == schema["properties"]["code"]  # type: ignore[index]
    assert props["color"] == schema["properties"]["color"]  # type: ignore[index]
    assert props["day"] == schema["properties"]["day"]  # type: ignore[index]
    assert props["note"] == schema["properties"]["note"]  # type: ignore[index]
    assert props["fixed"] == {"const": {"type": "array"}}
    validate_original = jsonschema.Draft202012Validator(schema).is_valid
    bounded_instance = {
        "tags": ["a"] * 8,
        "many": [0] * 20,
        "note": "x" * 1000,
        "count": -(10**15 - 1),
        "age": 10**15 - 1,
    }
    assert jsonschema.Draft202012Validator(out).is_valid(bounded_instance)
    assert validate_original(bounded_instance)  # what the bounds allow, the schema allows


def test_json_response_formats_become_constraints() -> None:
    (plan,) = _planner().plans(
        _chat(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT))
    )
    assert json.loads(plan.request.sampling.to_engine_json()["structured_outputs"]) == {  # type: ignore[arg-type]
        "json_object": True
    }
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    (plan,) = _planner().plans(_chat(response_format=_schema(schema)))
    engine = plan.request.sampling.to_engine_json()
    assert json.loads(engine["structured_outputs"]) == {"json": bounded(schema)}  # type: ignore[arg-type]


def test_a_fallback_without_tools_is_dropped_for_a_tool_request() -> None:
    primary = ModelSpec(id="m", triton_model="m", tool_parser="hermes", fallback="plain")
    plans = _planner(primary, PLAIN).plans(_chat(tools=(WEATHER,)))
    assert [p.spec.id for p in plans] == ["m"]


def _relay(*sources: FakeSource, spec: ModelSpec = CAPABLE) -> tuple[Relay, NodePool]:
    settings = Settings(
        orchestrator=OrchestratorSettings(triton=tuple(s.name for s in sources)), models=(spec,)
    )
    placement = {m.id: Placement(m.triton_model, settings.nodes_for(m)) for m in settings.models}
    pool = NodePool({s.name: s for s in sources}, placement, rng=Ordered())
    return relay_for(settings, pool), pool


async def _collect(relay: Relay, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in relay.stream(request)]


HERMES_WORDS = (
    "Checking.",
    "\n<tool",
    '_call>\n{"name": "get_',
    'weather", "arguments": {"city":',
    ' "Paris"}}\n</tool_call>',
    "\n<tool_call>",
    '{"name": "get_weather", "arguments": {"city": "Rome"}}',
    "</tool_call>",
)


async def test_the_relay_streams_text_then_typed_calls_and_ends_with_tool_calls() -> None:
    source = FakeSource(words=HERMES_WORDS)
    relay, pool = _relay(source)
    await pool.probe_once()
    chunks = await _collect(relay, _chat(tools=(WEATHER,)))
    assert chunks[0].start is not None and chunks[0].text == "Checking."
    assert "".join(c.text for c in chunks) == "Checking.\n"
    pieces = [p for c in chunks for p in c.tool_calls]
    first = [p for p in pieces if p.id]
    assert [(p.index, p.name) for p in first] == [(0, "get_weather"), (1, "get_weather")]
    arguments = ["".join(p.arguments for p in pieces if p.index == i) for i in (0, 1)]
    assert [json.loads(a) for a in arguments] == [{"city": "Paris"}, {"city": "Rome"}]
    assert len([p for p in pieces if p.index == 0]) >= 2  # the arguments streamed in pieces
    end = chunks[-1].end
    assert end is not None and end.finish_reason is FinishReason.TOOL_CALLS
    assert end.usage.completion_tokens == len(HERMES_WORDS)


async def test_without_parallel_calls_the_generation_stops_after_the_first() -> None:
    source = FakeSource(words=(*HERMES_WORDS, " and", " more", " words"), interval_s=0.01)
    relay, pool = _relay(source)
    await pool.probe_once()
    chunks = await _collect(relay, _chat(tools=(WEATHER,), parallel_tool_calls=False))
    assert {p.index for c in chunks for p in c.tool_calls} == {0}
    end = chunks[-1].end
    assert end is not None and end.finish_reason is FinishReason.TOOL_CALLS
    await asyncio.wait_for(source.ended.wait(), 1)
    assert source.cancelled == 1  # the rest was not generated
    assert end.usage.completion_tokens == 5


async def test_n_choices_fan_out_with_derived_seeds_over_the_nodes() -> None:
    a, b = FakeSource("a:1", interval_s=0.01), FakeSource("b:1", interval_s=0.01)
    relay, pool = _relay(a, b)
    await pool.probe_once()
    chunks = await _collect(relay, _chat(n=3, sampling=Sampling(seed=41)))
    assert len([c for c in chunks if c.start is not None]) == 1 and chunks[0].start is not None
    ends = {c.index: c.end for c in chunks if c.end is not None}
    assert sorted(ends) == [0, 1, 2]
    for index in range(3):
        text = "".join(c.text for c in chunks if c.index == index)
        assert text == "Hello world!"
        end = ends[index]
        assert end is not None and end.usage.completion_tokens == 3
    seeds = sorted(s.seed for s in a.samplings + b.samplings if s.seed is not None)
    assert seeds == [41, 42, 43]
    assert a.samplings and b.samplings  # the choices spread over both nodes


async def test_a_failing_choice_ends_the_request_with_the_usage_of_all() -> None:
    class FailsOnSeed(FakeSource):
        async def generate(self, model, prompt, sampling, request_id, headers=()):  # type: ignore[no-untyped-def]
            async for delta in super().generate(model, prompt, sampling, request_id, headers):
                if sampling.seed == 2 and delta.text == " world":
                    raise InvalidRequest("boom")
                yield delta

    source = FailsOnSeed(interval_s=0.01)
    relay, pool = _relay(source)
    await pool.probe_once()
    with pytest.raises(InvalidRequest) as failure:
        await _collect(relay, _chat(n=2, sampling=Sampling(seed=1)))
    assert failure.value.usage is not None and failure.value.usage.completion_tokens >= 2
    assert await eventually(lambda: source.cancelled == 2)  # both choices stopped...
    assert source.finished == 0  # ... neither ran to its end


async def test_logprobs_reach_the_chunks() -> None:
    relay, pool = _relay(FakeSource())
    await pool.probe_once()
    chunks = await _collect(relay, _chat(sampling=Sampling(top_logprobs=2)))
    entries = [e for c in chunks for e in c.logprobs]
    assert [e.token for e in entries] == ["Hello", " world", "!"]
    assert [e.logprob for e in entries] == [-1.0, -2.0, -3.0]
    assert [t.token for t in entries[0].top] == ["Hello", "alt0"]


def test_the_vllm_backends_logprobs_are_decoded_with_the_top_ones_by_rank() -> None:
    # As vllm_backend's create_response writes them: per token, the sampled token first, then
    # the top-k (here the sampled one is the second most likely).
    raw = json.dumps(
        [
            {
                "17": {"logprob": -0.9, "rank": 2, "decoded_token": " the"},
                "5": {"logprob": -0.6, "rank": 1, "decoded_token": " a"},
                "9": {"logprob": -3.1, "rank": 3, "decoded_token": " one"},
            },
            {"3": {"logprob": -0.1, "rank": 1, "decoded_token": " cat"}},
        ]
    ).encode()
    assert _logprobs(raw, 2) == (
        TokenLogprob(" the", -0.9, (Logprob(" a", -0.6), Logprob(" the", -0.9))),
        TokenLogprob(" cat", -0.1, (Logprob(" cat", -0.1),)),
    )
    assert _logprobs(b"null", 2) == ()


async def test_schema_checks_run_off_the_event_loop_once_per_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A schema's meta-check costs CPU in proportion to its size (about a second for 250 KB):
    it runs on a worker thread, and its verdict is remembered for the next turn of the agent."""
    from collections import OrderedDict

    from jsonschema import Draft202012Validator

    from tokenrelay.orchestrator import _schemas

    monkeypatch.setattr(_schemas, "_verdicts", OrderedDict())  # nothing remembered yet
    threads: list[str] = []
    check = Draft202012Validator.check_schema

    def recording(schema: object) -> None:
        threads.append(threading.current_thread().name)
        check(schema)  # type: ignore[arg-type]

    monkeypatch.setattr(Draft202012Validator, "check_schema", recording)
    relay, pool = _relay(FakeSource())
    await pool.probe_once()
    tool = Tool(
        "lookup", "", json.dumps({"type": "object", "properties": {"q": {"type": "integer"}}})
    )
    for _ in range(3):
        await _collect(relay, _chat(tools=(tool,)))
    assert len(threads) == 1 and threads[0] != threading.main_thread().name
    bad = Tool("lookup", "", json.dumps({"type": "object", "properties": {"q": {"type": 7}}}))
    for _ in range(2):
        with pytest.raises(InvalidRequest) as caught:
            await _collect(relay, _chat(tools=(bad,)))
        assert caught.value.param == "tools[0].function.parameters"
    assert len(threads) == 2 and threading.main_thread().name not in threads
