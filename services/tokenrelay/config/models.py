"""``[[models]]``: the catalog, public model ids and the Triton models behind them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION, AtLeastOne, Name


@dataclass(frozen=True, slots=True, config=SECTION)
class ModelSpec:
    """One catalog entry: a public model id and the Triton model that serves it. Whether a
    ``fallback`` names another entry is checked over the whole catalog (``Settings``)."""

    id: Name
    """The public model id (``model`` in requests, ``GET /v1/models``)."""
    triton_model: Name
    """The Triton model that serves it (a folder of the model repository)."""
    nodes: tuple[str, ...] = ()
    """This model's own Triton endpoints; empty: ``orchestrator.triton``."""
    chat_template: Name = "chatml"
    """A builtin name (chatml, llama3) or Jinja2 text in Hugging Face's ``chat_template`` form."""
    default_system_prompt: str = ""
    """Added when a chat has no system message of its own."""
    context_window: AtLeastOne = 2048
    """Tokens the model reads and writes in all; must match the model's own (e.g. n_ctx)."""
    default_max_tokens: AtLeastOne = 256
    """A request's max_tokens when it names none; at most ``context_window``."""
    owned_by: str = "tokenrelay"
    """``owned_by`` in ``GET /v1/models``."""
    fallback: str = ""
    """A catalog model that answers when no node of this one can; "" for none."""
    stream_interval_ms: Annotated[int, Field(ge=0, le=10_000)] = 0
    """Stream interval: tokens that arrive within this many ms of the previous message ride in
    the next one (fewer messages, less CPU per token; the first token and the end never wait).
    0: each model step goes out as it comes. A request may ask for its own, up to
    ``max_stream_interval_ms``."""
    max_stream_interval_ms: Annotated[int, Field(ge=0, le=10_000)] = 100
    """The most a request may ask for (its ``stream_interval_ms``); more is INVALID_ARGUMENT."""
    fallback_continues: bool = False
    """Whether the fallback may also continue a stream of this model whose node failed after
    tokens went out, when no node of this model can (the text so far rendered in the
    fallback's own template). Off: only this model's nodes continue its streams."""
    tool_parser: Literal["", "hermes", "llama3_json"] = ""
    """The tool-call format its template renders and it writes; "" refuses tools."""
    structured_outputs: bool = True
    """Constrained decoding: JSON response formats and forced tool calls (vLLM: yes)."""
    logprobs: bool = True
    """Returns log probabilities when asked (vLLM: yes)."""
    logit_bias: bool = True
    """Applies logit_bias (vLLM: yes); false: such requests get a 400, never ignored."""

    def __post_init__(self) -> None:
        if self.stream_interval_ms > self.max_stream_interval_ms:
            raise ValueError(
                f"model {self.id!r}: stream_interval_ms ({self.stream_interval_ms}) must not"
                f" exceed max_stream_interval_ms ({self.max_stream_interval_ms})"
            )
        if self.default_max_tokens > self.context_window:
            raise ValueError(
                f"model {self.id!r}: default_max_tokens ({self.default_max_tokens}) must fit"
                f" the context window ({self.context_window})"
            )
        if self.fallback == self.id:
            raise ValueError(f"model {self.id!r}: fallback must name another catalog model")
        if self.fallback_continues and not self.fallback:
            raise ValueError(f"model {self.id!r}: fallback_continues needs a fallback")


DEFAULT_MODELS = (
    ModelSpec(
        id="smollm2-135m-instruct",
        triton_model="smollm2",
        chat_template="chatml",
        # No system prompt: it scored best on benchmarks/eval (26 of 36 against 21 with
        # SmolLM2's own "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
        default_system_prompt="",
        context_window=2048,
        default_max_tokens=256,
        tool_parser="hermes",
    ),
    ModelSpec(
        id="synthetic",
        triton_model="synthetic",
        chat_template="chatml",
        context_window=4096,
        default_max_tokens=64,
        tool_parser="hermes",
        logit_bias=False,
    ),
)
"""The catalog when the file has no ``[[models]]``: the two CPU models of ``triton_models/``."""
