"""A Triton Python-backend model that embeds the batch of texts each request carries.

Input ``text`` (STRING, [n]); outputs ``embedding`` (FP32, [n, 384], unit length) and
``num_tokens`` (UINT32, [n], tokens each text counted after truncation). A request with no text,
or with text that is not UTF-8, gets an error response of its own; the others in the same
``execute`` call are unaffected.

This module runs inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tokenrelay.triton_python.minilm import MiniLMEmbedder

__all__ = ["EmbeddingModel"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _texts(request: Any) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, "text")
    if tensor is None:
        raise ValueError("text is required")
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0:
        raise ValueError("text must hold at least one string")
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError:
        raise ValueError("text is not valid UTF-8") from None


class EmbeddingModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        threads = int(parameters.get("threads", {}).get("string_value", "1"))
        self.embedder = MiniLMEmbedder(threads=threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                vectors, tokens = self.embedder.embed(_texts(request))
            except ValueError as error:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("embedding", np.ascontiguousarray(vectors, np.float32)),
                        pb_utils.Tensor("num_tokens", tokens.astype(np.uint32)),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        self.embedder = None  # type: ignore[assignment]
