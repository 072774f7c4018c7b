"""``[embeddings]``: the embedding model (in Triton) behind retrieval, the Embed RPC and
/v1/embeddings."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION, AtLeastOne, Name, Seconds


@dataclass(frozen=True, slots=True, config=SECTION)
class Embeddings:
    """``[embeddings]``."""

    id: Name = "all-minilm-l6-v2"
    """The public model id."""
    triton_model: Name = "minilm"
    """The Triton model (triton_models/minilm: all-MiniLM-L6-v2 on onnxruntime)."""
    nodes: tuple[str, ...] = ()
    """Its own Triton endpoints; empty: ``orchestrator.triton``."""
    dimensions: AtLeastOne = 384
    """Length of one embedding vector; must match the model's."""
    max_inputs: AtLeastOne = 256
    """Texts in one Embed call or /v1/embeddings request."""
    max_input_chars: AtLeastOne = 20_000
    """Per text (the model reads its first 256 tokens)."""
    batch_size: AtLeastOne = 32
    """Texts per Triton request."""
    timeout_s: Seconds = 30.0
    """One Triton request."""
