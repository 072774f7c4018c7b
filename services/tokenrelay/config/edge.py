"""``[edge]``: the OpenAI-compatible HTTP service, its client limits and its hop to the
orchestrator."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import (
    SECTION,
    AtLeastOne,
    HostPort,
    Seconds,
    SecondsOrOff,
    check_pair,
)


@dataclass(frozen=True, slots=True, config=SECTION)
class EdgeSettings:
    """``[edge]``. API keys come from ``api_keys_file`` and ``TOKENRELAY_API_KEY``; an edge that
    listens beyond loopback refuses to start without one (``check_exposure``)."""

    listen: HostPort = "127.0.0.1:8080"
    """The OpenAI API, /healthz and /readyz."""
    orchestrator: HostPort = "127.0.0.1:50051"
    """The orchestrator the edge calls."""
    max_body_bytes: AtLeastOne = 1024 * 1024
    """Larger request bodies get 413."""
    request_timeout_s: Seconds = 600.0
    """Budget of one request when the client states none (OpenAI SDKs send
    x-stainless-timeout)."""
    ready_timeout_s: Seconds = 1.0
    """``GET /v1/models`` waits 5 times this for the orchestrator. (``/readyz`` waits for nothing:
    it answers from the orchestrator's health, watched.)"""
    drain_grace_s: SecondsOrOff = 10.0
    """On SIGTERM: how long open requests get to finish."""
    keepalive_interval_s: Seconds = 15.0
    """``: ping`` comments on idle SSE streams."""
    api_keys_file: str = ""
    """TOML keys file (see tokenrelay.security, ``tokenrelay-keys new``); reread when changed."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API ("*": any)."""
    max_connections: AtLeastOne = 1024
    """Open connections; a connection beyond the cap gets 503 and is closed."""
    header_timeout_s: Seconds = 10.0
    """A new connection must send its request headers within this..."""
    body_timeout_s: Seconds = 30.0
    """... and its body within this (else 408)."""
    keepalive_timeout_s: Seconds = 75.0
    """Idle keep-alive connections close after this."""
    orchestrator_tls_ca: str = ""
    """TLS to the orchestrator (PEM path): its CA turns TLS on."""
    orchestrator_tls_cert: str = ""
    """... and the edge's client certificate and key, for mutual TLS."""
    orchestrator_tls_key: str = ""
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    """Edge processes sharing ``listen`` (SO_REUSEPORT) under one supervisor, which counts the
    API keys' limits for all of them; ``/metrics`` labels their samples ``worker``. 1: this
    process serves alone."""

    def __post_init__(self) -> None:
        check_pair(
            ("orchestrator_tls_cert", "orchestrator_tls_key"),
            self.orchestrator_tls_cert,
            self.orchestrator_tls_key,
        )
