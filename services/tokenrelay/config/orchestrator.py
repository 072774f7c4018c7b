"""``[orchestrator]`` and its tables: timeouts, limits, breaker, routing, admission,
continuation, TLS."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import (
    SECTION,
    AtLeastOne,
    AtLeastZero,
    CpuList,
    HostPort,
    HostPortOrOff,
    Seconds,
    SecondsOrOff,
    Share,
    check_pair,
)


@dataclass(frozen=True, slots=True, config=SECTION)
class Timeouts:
    """``[orchestrator.timeouts]``: deadlines of one generation, in seconds (like httpx's
    ``Timeout``). Each is > 0, and neither the first-token wait nor the silence between tokens
    may exceed ``total_s``: the total deadline would always fire first."""

    connect_s: Seconds = 2.0
    """Reaching a Triton node: the deadline of one readiness probe (server and model ready).
    Not part of a request's timeline, so it is not compared with the others."""
    first_token_s: Seconds = 60.0
    """Request sent → first token; past it the attempt is cancelled and retried on another node
    or answered DEADLINE_EXCEEDED (504)."""
    between_tokens_s: Seconds = 30.0
    """Longest silence between two tokens."""
    total_s: Seconds = 600.0
    """The whole generation; the caller's gRPC deadline may be shorter."""

    def __post_init__(self) -> None:
        for name in ("first_token_s", "between_tokens_s"):
            if getattr(self, name) > self.total_s:
                raise ValueError(
                    f"{name} ({getattr(self, name):g}) must not exceed total_s"
                    f" ({self.total_s:g}): the total deadline would fire first"
                )


@dataclass(frozen=True, slots=True, config=SECTION)
class Limits:
    """``[orchestrator.limits]``: bounds on what one request may ask for."""

    max_messages: AtLeastOne = 256
    max_message_chars: AtLeastOne = 100_000
    max_prompt_chars: AtLeastOne = 400_000
    """All messages together, or a raw prompt."""
    max_stop_sequences: AtLeastZero = 4
    """0: requests may not name stop sequences."""
    max_stop_chars: AtLeastOne = 100
    max_request_id_chars: AtLeastOne = 128
    max_labels: AtLeastZero = 32
    """0: requests may not carry labels."""
    max_n: AtLeastOne = 16
    """Answers (choices) one request may ask for."""
    max_tools: AtLeastZero = 128
    """Tools one request may offer; 0: none."""
    max_schema_chars: AtLeastOne = 100_000
    """A tool's parameters, or a response format's schema, as JSON text."""


@dataclass(frozen=True, slots=True, config=SECTION)
class Breaker:
    """``[orchestrator.breaker]``: the circuit breaker of each Triton node (closed → open →
    half-open → closed)."""

    failure_threshold: AtLeastOne = 3
    """Consecutive failed requests that open it..."""
    failure_rate: Share = 0.5
    """... or this share of failed requests..."""
    window_s: Seconds = 30.0
    """... among those that ended in this window..."""
    min_requests: AtLeastOne = 10
    """... once the window holds at least this many."""
    cooldown_s: SecondsOrOff = 5.0
    """Open → half-open (a failed readiness probe reopens it); 0: half-open at once."""
    half_open_probes: AtLeastOne = 1
    """Trial requests let through at once while half-open."""


@dataclass(frozen=True, slots=True, config=SECTION)
class Routing:
    """``[orchestrator.routing]``: how a request finds a node (least in flight of two picked at
    random), and what happens when that node fails it."""

    max_retries: AtLeastZero = 1
    """Retries on another node while nothing has reached the caller yet (node down, no first
    token in time, model error)."""
    hedge_after_s: SecondsOrOff = 0.0
    """Send the request to a second node as well when no first token has come after this long;
    the first to answer wins, the other is cancelled. 0 turns hedging off; it must be shorter
    than ``timeouts.first_token_s`` (checked in ``[orchestrator]``), or it never fires."""
    prefix_affinity_chars: AtLeastZero = 0
    """Send prompts sharing their first N characters to the same node (its prefix cache). 0: off."""
    affinity_slack: AtLeastZero = 4
    """... unless that node has this many more requests in flight than the least busy one."""


@dataclass(frozen=True, slots=True, config=SECTION)
class Admission:
    """``[orchestrator.admission]``: the work one orchestrator accepts; past it,
    RESOURCE_EXHAUSTED (429) with a Retry-After hint."""

    max_concurrent: AtLeastOne = 64
    """Generations running at once."""
    max_queue: AtLeastZero = 256
    """Requests waiting for a slot; 0: refuse at once when every slot is taken."""
    queue_timeout_s: SecondsOrOff = 10.0
    """Longest wait for a slot."""
    retry_after_s: SecondsOrOff = 1.0
    """The Retry-After hint given to refused callers."""


@dataclass(frozen=True, slots=True, config=SECTION)
class Continuation:
    """``[orchestrator.continuation]``: what happens when a stream's node fails, is found hung
    or stalls after tokens went out. With it on, another node continues the answer (the same
    rendered prompt plus the text streamed so far, as the assistant's partial turn) and the
    caller's stream goes on with no gap and no error; off, the stream ends with an error."""

    enabled: bool = True
    """Continue interrupted streams on another node; false: end them with an error."""
    max_continuations: AtLeastOne = 2
    """Continuations one answer may take; the next failure ends the stream with an error."""


@dataclass(frozen=True, slots=True, config=SECTION)
class Discovery:
    """``[orchestrator.discovery]``: nodes named by DNS (``dns:///name:port``, or
    ``dns://server:53/name:port`` to ask that server, in ``triton`` or a model's ``nodes``)."""

    interval_s: Seconds = 5.0
    """Between two resolutions of each name; new addresses are probed before they take
    requests, removed ones drained (their requests in flight finish)."""
    timeout_s: Seconds = 2.0
    """One resolution; a failed one keeps the nodes known so far."""


@dataclass(frozen=True, slots=True, config=SECTION)
class OrchestratorSettings:
    """``[orchestrator]``: the gRPC service, its Triton nodes and the tables above."""

    listen: HostPort = "127.0.0.1:50051"
    """The gRPC API (tokenrelay.v1 services, health, reflection)."""
    frames_listen: HostPortOrOff = ""
    """``GenerateStream`` also as frames (``tokenrelay._frames``), for an edge on this host
    (``edge.orchestrator_frames``): the same calls behind the same checks as on ``listen``,
    without gRPC's threads on the way (a hop's time to first message ~0.1 to 0.2 ms against
    ~0.6 to 1.2 ms, its CPU per message ~5 against ~60 to 90 µs, ``benchmarks/grpc_hops.py``).
    Loopback only: the hop has no TLS. ``""``: off."""
    metrics_listen: HostPortOrOff = "127.0.0.1:9464"
    """Prometheus ``GET /metrics`` over HTTP; "" turns it off."""
    health_listen: HostPortOrOff = ""
    """HTTP ``/healthz`` (the process and its event loop live: 503 once the loop has run nothing
    for 10 s) and ``/readyz`` (serving: a model has a ready node, not draining), answered by a
    thread of their own (``tokenrelay._probes``), for probes that speak no gRPC. ``""``: off
    (gRPC's health service on ``listen`` answers either way)."""
    triton: tuple[str, ...] = ("127.0.0.1:8001",)
    """Triton gRPC endpoints of every model that names no ``nodes`` of its own."""
    probe_interval_s: Seconds = 1.0
    """The readiness probe of each node. A probe that fails (no answer within
    ``timeouts.connect_s``, or not ready) moves the node's requests elsewhere at once: those
    waiting for a first token are retried, streaming ones continued (``continuation``)."""
    drain_grace_s: SecondsOrOff = 30.0
    """On SIGTERM: how long in-flight streams get to finish."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    breaker: Breaker = field(default_factory=Breaker)
    routing: Routing = field(default_factory=Routing)
    admission: Admission = field(default_factory=Admission)
    continuation: Continuation = field(default_factory=Continuation)
    discovery: Discovery = field(default_factory=Discovery)
    clients_file: str = ""
    """gRPC callers with identities of their own: a keys file as the edge's (``tokenrelay-keys
    new``); an entry may name ``san``, its mTLS client certificate's subject alternative name.
    Its limits (``requests_per_minute``, ``max_streams``, token limits) hold here."""
    tls_cert: str = ""
    """TLS of the gRPC API (PEM path): with ``tls_key`` it turns TLS on; empty: plaintext."""
    tls_key: str = ""
    tls_client_ca: str = ""
    """Makes the API's TLS mutual: callers must present a certificate this CA signed."""
    triton_tls_ca: str = ""
    """TLS to Triton (its ``--grpc-use-ssl``): the CA that signed Triton's certificate."""
    triton_tls_cert: str = ""
    """... and the certificate and key presented for ``--grpc-use-ssl-mutual``."""
    triton_tls_key: str = ""
    triton_streams: Literal["h2", "grpc"] = "h2"
    """The client of generation streams to Triton: ``h2``, tokenrelay's own HTTP/2 client
    (``orchestrator/_h2.py``; ~20 against ~55 µs of CPU per message read and decoded,
    ``benchmarks/h2_read.py``) for ``host:port`` addresses, or ``grpc`` (``grpc.aio``, as every
    other call to Triton). Both speak the same gRPC method and report failures alike."""
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    """Orchestrator processes sharing its ports (``listen``, ``frames_listen``,
    ``metrics_listen``, ``health_listen``: SO_REUSEPORT) under one
    supervisor, which holds the admission limits for all of them; ``/metrics`` labels their
    samples ``worker``. 1: this process serves alone."""
    cpus: CpuList = ""
    """Cores to run on (``"12-15"``): every process of the service, every thread, on those
    (workers and supervisor alike), so that the relay and the inference server beside it keep
    to cores of their own; ``""``: wherever the system puts them (``tokenrelay._affinity``)."""

    def __post_init__(self) -> None:
        check_pair(("tls_cert", "tls_key"), self.tls_cert, self.tls_key)
        check_pair(("triton_tls_cert", "triton_tls_key"), self.triton_tls_cert, self.triton_tls_key)
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        hedge, first = self.routing.hedge_after_s, self.timeouts.first_token_s
        if hedge and hedge >= first:
            raise ValueError(
                f"routing.hedge_after_s ({hedge:g}) must be shorter than timeouts.first_token_s"
                f" ({first:g}), or the first attempt is given up before a hedge is sent"
            )
