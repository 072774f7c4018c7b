"""A running stack named by ``TOKENRELAY_TEST_STACK``, for the tests that hold on any backend.

The tests marked ``any_backend`` (model contract, cancellation, the openai SDK, forced tool calls
and structured outputs) assert what every backend owes a client — the CPU models and Triton's
vLLM model alike. Without the variable they run on the system tier's own CPU stack, as every
system test does. With it they run against the stack it names, which nobody starts or stops
here, and only they are collected::

    TOKENRELAY_TEST_STACK=edge=http://H:8080,orchestrator=H:50051,triton=H:8001[,metrics=URL]
        [,model=CATALOG_ID][,triton_model=TRITON_NAME]

``metrics`` defaults to ``http://<triton host>:<triton port + 1>/metrics`` (Triton's own
layout: gRPC 8001, metrics 8002); ``model`` and ``triton_model`` name the SmolLM2 the tests talk
to, by the catalog's id and by Triton's model name (the CPU stack's by default:
``smollm2-135m-instruct`` served as ``smollm2``; a GPU stack serves it as ``smollm2_vllm``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ENV", "MODELS", "StackUnderTest", "TargetModels", "TargetStack", "target_from_env"]

ENV = "TOKENRELAY_TEST_STACK"
_REQUIRED = ("edge", "orchestrator", "triton")
_OPTIONAL = ("metrics", "model", "triton_model")


@dataclass(frozen=True, slots=True)
class TargetModels:
    """SmolLM2 as the tests address it: the catalog's id (edge, orchestrator) and Triton's
    model name (straight over Triton's gRPC stream, and its metrics' ``model`` label)."""

    chat: str = "smollm2-135m-instruct"
    triton: str = "smollm2"


@dataclass(frozen=True, slots=True)
class TargetStack:
    """A stack started elsewhere: the addresses the ``any_backend`` tests use, as ``Stack``
    names them."""

    edge_url: str
    orchestrator_address: str
    triton_grpc: str
    triton_metrics_url: str
    models: TargetModels


class StackUnderTest(Protocol):
    """What an ``any_backend`` test may use of its ``stack`` fixture: ``Stack`` (the CPU stack the
    tier starts) and ``TargetStack`` both have it."""

    @property
    def edge_url(self) -> str: ...
    @property
    def orchestrator_address(self) -> str: ...
    @property
    def triton_grpc(self) -> str: ...
    @property
    def triton_metrics_url(self) -> str: ...


def target_from_env(environ: Mapping[str, str] = os.environ) -> TargetStack | None:
    """The stack ``TOKENRELAY_TEST_STACK`` names; None when it is unset or empty. A malformed
    value raises ``ValueError`` saying what is wrong (the run stops before any test)."""
    text = environ.get(ENV, "").strip()
    if not text:
        return None
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not value.strip():
            raise ValueError(f"{ENV}: {item!r} is not key=value")
        if key not in _REQUIRED + _OPTIONAL:
            raise ValueError(
                f"{ENV}: unknown key {key!r} (known: {', '.join(_REQUIRED + _OPTIONAL)})"
            )
        fields[key] = value.strip()
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise ValueError(
            f"{ENV}: missing {', '.join(missing)} (e.g. {_REQUIRED[0]}=http://host:8080)"
        )
    edge = fields["edge"].rstrip("/")
    if not edge.startswith(("http://", "https://")):
        raise ValueError(f"{ENV}: edge must be a URL (http://host:port), got {edge!r}")
    triton = fields["triton"]
    host, _, port = triton.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV}: triton must be host:port (its gRPC port), got {triton!r}")
    defaults = TargetModels()
    return TargetStack(
        edge_url=edge,
        orchestrator_address=fields["orchestrator"],
        triton_grpc=triton,
        triton_metrics_url=fields.get("metrics", f"http://{host}:{int(port) + 1}/metrics"),
        models=TargetModels(
            chat=fields.get("model", defaults.chat),
            triton=fields.get("triton_model", defaults.triton),
        ),
    )


# Read once at import: test modules name their SmolLM2 by these (module-level parameters too).
_TARGET = target_from_env()
MODELS = _TARGET.models if _TARGET is not None else TargetModels()
