"""The committed generated code matches protos/."""

from __future__ import annotations

import subprocess
import sys

from _support import REPO


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
