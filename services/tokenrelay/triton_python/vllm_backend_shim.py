"""NVIDIA's Triton vLLM backend, made to run on the ``nvidia-pytriton`` wheel's Triton 2.51 with
vLLM 0.20 (the no-Docker GPU path; NVIDIA's image needs none of this).

``tokenrelay-stack --gpu --gpu-engine nvidia`` lays out the backend directory as
``backends/vllm/model.py`` = this file, ``backends/vllm/nvidia_model.py`` = the backend's own
``src/model.py`` and ``backends/vllm/utils/`` = its ``src/utils/``, unchanged (third-party code is
not copied into this repository: the operator points ``--vllm-backend-src`` at a checkout). Two
things are fixed from the outside:

1. vllm_backend (at 8de0c14) imports ``TokensPrompt`` from ``vllm.inputs.data``, which vLLM 0.20
   folded into ``vllm.inputs``: an alias module is registered when the old one is missing.
2. Triton 2.51's Python backend frees a decoupled request's input tensors when ``execute``
   returns, but the backend reads them later on its event-loop thread (seen on the GPU host:
   ``unpack_from requires a buffer of at least … bytes``). ``execute`` copies every input first,
   and the backend's reads are served from the copy until the request ends.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import vllm.inputs.data
except ImportError:
    import vllm.inputs

    sys.modules["vllm.inputs.data"] = vllm.inputs

_COPIES: dict[int, dict[str, Any]] = {}
_read_input = pb_utils.get_input_tensor_by_name


def _copied_input(request: Any, name: str) -> Any:
    copies = _COPIES.get(id(request))
    return _read_input(request, name) if copies is None else copies.get(name)


pb_utils.get_input_tensor_by_name = _copied_input

from nvidia_model import TritonPythonModel as _Backend  # type: ignore[import-not-found]  # noqa: E402


class TritonPythonModel(_Backend):  # type: ignore[misc]
    def execute(self, requests: list[Any]) -> Any:
        for request in requests:
            _COPIES[id(request)] = {
                t.name(): pb_utils.Tensor(t.name(), np.array(t.as_numpy(), copy=True))
                for t in request.inputs()
            }
        return super().execute(requests)

    async def _infer(self, request: Any) -> Any:
        try:
            return await super()._infer(request)
        finally:
            _COPIES.pop(id(request), None)
