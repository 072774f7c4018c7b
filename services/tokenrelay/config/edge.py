"""``[edge]``: the OpenAI-compatible HTTP service, its client limits and its hop to the
orchestrator; ``[edge.resume]`` (resumable SSE streams) and ``[edge.websocket]``."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated

from pydantic import Field
from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import (
    SECTION,
    AtLeastOne,
    CpuList,
    HostPort,
    HostPortOrOff,
    Seconds,
    SecondsOrOff,
    check_pair,
)


@dataclass(frozen=True, slots=True, config=SECTION)
class Resume:
    """``[edge.resume]``: a streamed chat completion outlives its connection. Its events carry
    ids; a client whose connection dropped reopens it with ``GET
    /v1/chat/completions/{id}/stream`` (``Last-Event-ID``: the last event it got) and receives
    what it missed, then the rest, while the generation went on meanwhile."""

    grace_s: SecondsOrOff = 10.0
    """How long a stream whose client went away keeps generating, waiting to be resumed (then
    the generation is cancelled, at Triton too); a finished one is kept as long for a late
    resume. The cost: an abandoned stream generates for up to this long (a client that is done
    says so: ``POST /v1/chat/completions/{id}/cancel``). 0: not resumable (a client that goes
    away cancels the generation at once)."""
    buffer_bytes: AtLeastOne = 256 * 1024
    """Each stream's replay buffer holds its most recent events up to this many bytes; resuming
    from an older event gets 410."""


@dataclass(frozen=True, slots=True, config=SECTION)
class WebSocket:
    """``[edge.websocket]``: ``GET /v1/ws``, chat completions over one socket (messages are
    bounded by ``max_body_bytes``; pings every ``keepalive_interval_s``; a browser's ``auth``
    message is due within ``header_timeout_s``)."""

    max_generations: AtLeastOne = 8
    """Generations one socket may run at once; more are refused with an error message."""


@dataclass(frozen=True, slots=True, config=SECTION)
class EdgeSettings:
    """``[edge]``. API keys come from ``api_keys_file`` and ``TOKENRELAY_API_KEY``; an edge that
    listens beyond loopback refuses to start without one (``check_exposure``)."""

    listen: HostPort = "127.0.0.1:8080"
    """The OpenAI API, /healthz and /readyz."""
    health_listen: HostPortOrOff = ""
    """``/healthz`` and ``/readyz`` also on this port, answered by a thread of their own so that
    a probe never waits behind the streams (``tokenrelay._probes``); its ``/healthz`` fails
    (503) once the event loop has run nothing for 10 s. Point liveness and readiness probes
    here. ``""``: off (the probes are on ``listen`` only)."""
    orchestrator: HostPort = "127.0.0.1:50051"
    """The orchestrator the edge calls."""
    orchestrator_frames: HostPortOrOff = ""
    """The orchestrator's ``frames_listen``: generations (``GenerateStream``) go there as
    frames (``tokenrelay._frames``), the rest to ``orchestrator`` over gRPC. Loopback only.
    ``""``: everything over gRPC."""
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
    """Edge processes sharing ``listen`` and ``health_listen`` (SO_REUSEPORT) under one
    supervisor, which counts the API keys' limits for all of them; ``/metrics`` labels their
    samples ``worker``. 1: this process serves alone."""
    cpus: CpuList = ""
    """Cores to run on (``"12-15"``): every process of the service, every thread, on those
    (workers and supervisor alike), so that the relay and the inference server beside it keep
    to cores of their own; ``""``: wherever the system puts them (``tokenrelay._affinity``)."""
    resume: Resume = field(default_factory=Resume)
    websocket: WebSocket = field(default_factory=WebSocket)

    def __post_init__(self) -> None:
        check_pair(
            ("orchestrator_tls_cert", "orchestrator_tls_key"),
            self.orchestrator_tls_cert,
            self.orchestrator_tls_key,
        )
