"""Test tiers: tests/unit (fakes, no sockets), tests/inprocess (servers on port 0 in this
process), tests/system (real tritonserver, orchestrator and edge processes; marked `system`).

With ``TOKENRELAY_TEST_STACK`` set (``_support.target``), only the tests marked ``any_backend``
are collected, and they run against the stack it names instead of one of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from _support.target import ENV, target_from_env

SYSTEM = Path(__file__).resolve().parent / "system"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "any_backend: holds on every backend; runs against TOKENRELAY_TEST_STACK when it is set",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)
    if target_from_env() is None:
        return
    kept = [item for item in items if item.get_closest_marker("any_backend")]
    left = [item for item in items if not item.get_closest_marker("any_backend")]
    if left:
        config.hook.pytest_deselected(items=left)
    items[:] = kept


def pytest_report_header(config: pytest.Config) -> str | None:
    target = target_from_env()
    if target is None:
        return None
    return (
        f"{ENV}: edge {target.edge_url}, orchestrator {target.orchestrator_address}, triton "
        f"{target.triton_grpc} ({target.triton_metrics_url}), model {target.models.chat} "
        f"(Triton: {target.models.triton}); only tests marked any_backend"
    )
