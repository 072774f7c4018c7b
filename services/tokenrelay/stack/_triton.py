"""Running the real ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel.

Two things the wheel does not do by itself (see shared/TRITON-CPU.md): the Python-backend stub must
sit next to ``libtriton_python.so``, so we build a backend directory of links; and the stub finds
its Python as ``python3`` on ``PATH``, so the running interpreter's ``bin/`` goes first.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

from tokenrelay._grpc_io import without_our_choice

__all__ = [
    "TritonPorts",
    "cpu_models",
    "prepare_backends",
    "pytriton_root",
    "triton_command",
    "triton_env",
]


@dataclass(frozen=True, slots=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def pytriton_root() -> Path:
    """The ``tritonserver`` folder inside the installed ``nvidia-pytriton`` wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "nvidia-pytriton is not installed; install tokenrelay with the 'cpu' extra"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def prepare_backends(workdir: Path) -> Path:
    """Make ``workdir/backends/python`` with the backend library, its utils and the stub for this
    Python. Returns the backend directory. Safe to call again on the same folder."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(
            f"nvidia-pytriton ships no Python-backend stub for Python {version}"
        )
    workdir = workdir.resolve()
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        link = python / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return workdir / "backends"


def triton_command(
    model_repository: Path,
    backends: Path,
    ports: TritonPorts,
    models: tuple[str, ...] = (),
    host: str = "127.0.0.1",
) -> list[str]:
    """The command line of a CPU-only tritonserver on ``host``.

    With ``models`` given, only those models are loaded; otherwise every model of the repository
    that runs on a CPU (Python backend), never the GPU ones (the vLLM backend is not here).
    """
    models = models or cpu_models(model_repository)
    command = [
        str(pytriton_root() / "bin" / "tritonserver"),
        f"--model-repository={model_repository}",
        f"--backend-directory={backends}",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        # A unique shared-memory prefix lets several servers run on one machine.
        f"--backend-config=python,shm-region-prefix-name=tokenrelay{uuid.uuid4().hex[:12]}",
        "--exit-timeout-secs=10",
        "--log-info=false",
    ]
    command.append("--model-control-mode=explicit")
    command.extend(f"--load-model={m}" for m in models)
    return command


def cpu_models(model_repository: Path) -> tuple[str, ...]:
    """The models of ``model_repository`` whose backend is Python (ours), by name."""
    found = []
    for config in sorted(model_repository.glob("*/config.pbtxt")):
        if re.search(r'^\s*backend:\s*"python"', config.read_text(), re.MULTILINE):
            found.append(config.parent.name)
    return tuple(found)


def triton_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver: this interpreter first on PATH and its libpython found."""
    env = without_our_choice(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libdir), env.get("LD_LIBRARY_PATH", "")) if p
        )
    return env
