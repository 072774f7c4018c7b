"""The clients people already use, pointed at the running edge: LiteLLM and Google ADK's LiteLlm
model, streaming and not (the openai SDK has its own module)."""

from __future__ import annotations

import os

import pytest

from tokenrelay.stack import Stack

# LiteLLM fetches a model cost map from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

# Third-party import-time noise (pydantic, google-genai) is not ours to fail on.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
async def test_litellm_completion_streaming_and_not(stack: Stack, provider: str) -> None:
    import litellm

    common = {
        "model": f"{provider}/synthetic",
        "api_base": f"{stack.edge_url}/v1",
        "api_key": "unused",
        "messages": MESSAGES,
        "max_tokens": 6,
    }
    answer = await litellm.acompletion(**common)
    assert len(answer.choices[0].message.content.split()) == 6
    assert answer.usage.completion_tokens == 6
    assert answer.choices[0].finish_reason == "length"
    pieces = []
    stream = await litellm.acompletion(**common, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) == 6 and len("".join(pieces).split()) == 6


@pytest.mark.parametrize("streaming", [False, True])
async def test_google_adk_agent_runs_one_turn_through_the_edge(
    stack: Stack, streaming: bool
) -> None:
    from google.adk.agents import LlmAgent
    from google.adk.agents.run_config import RunConfig, StreamingMode
    from google.adk.models.lite_llm import LiteLlm
    from google.adk.runners import Runner
    from google.adk.sessions import InMemorySessionService
    from google.genai import types

    model = LiteLlm(
        model="hosted_vllm/synthetic",
        api_base=f"{stack.edge_url}/v1",
        api_key="unused",
        max_tokens=5,
    )
    agent = LlmAgent(name="assistant", model=model, instruction="Answer in one sentence.")
    sessions = InMemorySessionService()
    runner = Runner(agent=agent, app_name="tokenrelay", session_service=sessions)
    session = await sessions.create_session(app_name="tokenrelay", user_id="operator")
    mode = StreamingMode.SSE if streaming else StreamingMode.NONE
    partial, final = [], []
    async for event in runner.run_async(
        user_id="operator",
        session_id=session.id,
        new_message=types.Content(role="user", parts=[types.Part(text="Hello there")]),
        run_config=RunConfig(streaming_mode=mode),
    ):
        texts = [p.text for p in (event.content.parts if event.content else []) if p.text]
        (partial if event.partial else final).extend(texts)
    assert len(" ".join(final).split()) == 5  # the synthetic model's five words, once
    if streaming:
        assert len(partial) == 5  # and they came one by one first
    else:
        assert not partial
