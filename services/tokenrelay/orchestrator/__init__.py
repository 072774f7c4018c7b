"""The gRPC orchestration service: validation, templates, routing over Triton nodes."""

from tokenrelay.orchestrator.server import Orchestrator, serve

__all__ = ["Orchestrator", "serve"]
