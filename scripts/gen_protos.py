"""Generate Python code and typed stubs from protos/ into services/ (the import root).

    python scripts/gen_protos.py            write the generated files
    python scripts/gen_protos.py --check    exit 1 when the committed files differ from a fresh run

Output paths follow the proto package (tokenrelay.v1 → services/tokenrelay/v1/), so generated
imports work as they are.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "services"


def generate(out: Path) -> list[Path]:
    """Run protoc with mypy-protobuf on every proto; returns the written files, relative to out."""
    # protoc finds the mypy-protobuf plugins on PATH: they sit beside this interpreter.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    sources = sorted(PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in out.rglob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    if not check:
        for path in generate(OUT):
            print(f"wrote services/{path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p.relative_to(OUT) for p in OUT.rglob("*_pb2*.py*"))
        stale = [str(p) for p in fresh if not filecmp.cmp(Path(tmp) / p, OUT / p, shallow=False)]
        stale += [str(p) for p in set(fresh) ^ set(committed)]
    if stale:
        print("generated code is out of date with protos/; run `make protos`:", *stale, sep="\n  ")
        return 1
    print("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
