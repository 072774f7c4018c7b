"""Triton Python-backend entry point: the vLLM-contract shell around tokenrelay's LlamaEngine.

The Python that runs this stub must have tokenrelay installed (the embedded stack runs Triton with
the project's virtual environment first on PATH).
"""

from tokenrelay.triton_python._model import DecoupledLLMModel
from tokenrelay.triton_python.llama import LlamaEngine


class TritonPythonModel(DecoupledLLMModel):
    engine_factory = LlamaEngine.from_parameters
