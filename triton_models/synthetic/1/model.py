"""Triton Python-backend entry point: the vLLM-contract shell around tokenrelay's SyntheticEngine.

The Python that runs this stub must have tokenrelay installed (the embedded stack runs Triton with
the project's virtual environment first on PATH).
"""

from tokenrelay.triton_python._model import DecoupledLLMModel
from tokenrelay.triton_python.synthetic import SyntheticEngine


class TritonPythonModel(DecoupledLLMModel):
    engine_factory = SyntheticEngine.from_parameters
