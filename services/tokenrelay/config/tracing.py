"""``[tracing]``: where each service sends its spans (see tokenrelay.tracing)."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION

Exporter = Literal["none", "console", "otlp"]


@dataclass(frozen=True, slots=True, config=SECTION)
class Tracing:
    """``[tracing]``: OpenTelemetry, one trace per request (edge → orchestrator → Triton)."""

    exporter: Exporter = "none"
    """none, console (spans on stderr) or otlp (OTLP over HTTP, protobuf)."""
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    """The OTLP/HTTP traces endpoint (exporter otlp)."""
