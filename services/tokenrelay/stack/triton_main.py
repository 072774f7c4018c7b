"""``tokenrelay-triton``: run the real tritonserver of the ``nvidia-pytriton`` wheel with the
CPU models, in the foreground (the container image of the compose file's ``cpu`` profile).

    tokenrelay-triton --model-repository /models [--host 0.0.0.0] [--model NAME ...]
                      [tritonserver options ...]

Without ``--model`` it loads every CPU (Python-backend) model of the repository.

The process becomes tritonserver (exec), so signals reach it directly.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tokenrelay.stack._triton import TritonPorts, prepare_backends, triton_command, triton_env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenrelay-triton", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("triton_models"))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--workdir", type=Path, default=None, help="for the backend links")
    parser.add_argument("--model", action="append", default=[], help="a model to load (repeatable)")
    args, extra = parser.parse_known_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tokenrelay-triton-"))
    command = triton_command(
        args.model_repository.resolve(),
        prepare_backends(workdir),
        TritonPorts(),
        tuple(args.model),
        host=args.host,
    )
    os.execve(command[0], [*command, *extra], triton_env())


if __name__ == "__main__":
    main()
