"""Triton Python-backend entry point: tokenrelay's MiniLM embedder (onnxruntime).

The Python that runs this stub must have tokenrelay installed (the embedded stack runs Triton with
the project's virtual environment first on PATH).
"""

from tokenrelay.triton_python.embedding import EmbeddingModel


class TritonPythonModel(EmbeddingModel):
    pass
