"""The in-process tier's orchestrator: gRPC and frames on port 0 over the module's ``source``
fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from _support import FakeSource
from tokenrelay.config import OrchestratorSettings, Settings
from tokenrelay.orchestrator import Orchestrator


@pytest.fixture
async def orchestrator(source: FakeSource) -> AsyncIterator[Orchestrator]:
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=(source.name,), metrics_listen="127.0.0.1:0", frames_listen="127.0.0.1:0"
        )
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)
