"""Print the path of one streamed request through tokenrelay's own modules (the README's
architecture section is written from it; ``tests/_support/request_path.py`` says how it is
measured, and ``tests/inprocess/test_architecture.py`` bounds it).

    .venv/bin/python scripts/request_path.py [--calls]

``--calls`` also lists each entry: phase, module, function, and the module it came from.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _support.request_path import measure


def main() -> None:
    path = asyncio.run(measure())
    print("\n".join(path.lines()))
    if "--calls" in sys.argv[1:]:
        for (phase, module, function, caller), count in sorted(path.calls.items()):
            print(f"  {phase:6s} {count:3d}  {module} {function}  <- {caller}")


if __name__ == "__main__":
    main()
