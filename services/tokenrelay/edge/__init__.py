"""The HTTP edge: the OpenAI API over REST and Server-Sent Events, relayed to the orchestrator."""

from tokenrelay.edge.app import create_app, run

__all__ = ["create_app", "run"]
