"""Test tiers: tests/unit (fakes, no sockets), tests/inprocess (servers on port 0 in this
process), tests/system (real tritonserver, orchestrator and edge processes; marked `system`)."""

from __future__ import annotations

from pathlib import Path

import pytest

SYSTEM = Path(__file__).resolve().parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)
