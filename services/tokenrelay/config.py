"""Settings: one TOML file, environment overrides, frozen typed objects.

Read once, in a service's ``__main__``, and passed to constructors; nothing else reads the
environment. The file's sections are ``[orchestrator]`` (with ``[orchestrator.timeouts]``,
``.limits``, ``.breaker``, ``.routing`` and ``.admission``), ``[[models]]`` (the catalog) and
``[edge]``; see ``tokenrelay.toml`` at the repository root for every key with its default.
Unknown keys are errors, so a typo never goes unnoticed.

Environment overrides (the one registry of variables):

================================  =====================================================
TOKENRELAY_CONFIG                 path of the TOML file (default: built-in defaults)
TOKENRELAY_ORCHESTRATOR_LISTEN    orchestrator listen address, host:port
TOKENRELAY_ORCHESTRATOR_METRICS   orchestrator /metrics address, host:port ("" for none)
TOKENRELAY_TRITON                 comma-separated Triton gRPC endpoints for every model
                                  that names no nodes of its own
TOKENRELAY_EDGE_LISTEN            edge listen address, host:port
TOKENRELAY_EDGE_ORCHESTRATOR      the orchestrator the edge calls, host:port
TOKENRELAY_LOG_LEVEL              DEBUG, INFO, WARNING or ERROR
TOKENRELAY_EVENT_LOOP             auto (uvloop when installed), uvloop or asyncio
TOKENRELAY_TRACING                none, console or otlp
TOKENRELAY_TRACING_ENDPOINT       the OTLP/HTTP traces endpoint
TOKENRELAY_API_KEY                one API key the edge accepts (besides edge.api_keys_file)
TOKENRELAY_INTERNAL_SECRET        the shared secret of the edge → orchestrator hop
TOKENRELAY_INTERNAL_SECRET_FILE   ... or a file holding it (e.g. a mounted Kubernetes secret)
TOKENRELAY_VECTOR_STORE           qdrant, pgvector or none (retrieval.store)
TOKENRELAY_QDRANT_PATH            Qdrant's local on-disk directory (retrieval.qdrant_path)
TOKENRELAY_QDRANT_URL             a Qdrant server or cluster (retrieval.qdrant_url)
TOKENRELAY_POSTGRES_DSN           PostgreSQL connection string for pgvector (may hold a
                                  password, hence environment only)
================================  =====================================================

Secrets come only from the environment (or a file it names), never from the TOML file, and they
never show in a repr. A service that listens beyond loopback refuses to start without them: the
edge without API keys, the orchestrator without the internal secret or mutual TLS.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tokenrelay.security import Secret, is_loopback

__all__ = [
    "Admission",
    "Breaker",
    "EdgeSettings",
    "Embeddings",
    "Limits",
    "ModelSpec",
    "OrchestratorSettings",
    "Retrieval",
    "Routing",
    "Secrets",
    "Settings",
    "Timeouts",
    "Tracing",
    "check_exposure",
    "load_settings",
    "split_hostport",
]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of one generation, in seconds (like httpx's ``Timeout``)."""

    connect_s: float = 2.0  # reaching a Triton node (readiness probes)
    first_token_s: float = 60.0  # request sent → first token
    between_tokens_s: float = 30.0  # longest silence between two tokens
    total_s: float = 600.0  # whole generation; the caller's gRPC deadline may be shorter


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request may ask for."""

    max_messages: int = 256
    max_message_chars: int = 100_000
    max_prompt_chars: int = 400_000
    max_stop_sequences: int = 4
    max_stop_chars: int = 100
    max_request_id_chars: int = 128
    max_labels: int = 32


@dataclass(frozen=True, slots=True)
class Breaker:
    """The circuit breaker of each Triton node (closed → open → half-open → closed)."""

    failure_threshold: int = 3  # consecutive failures that open it
    failure_rate: float = 0.5  # ... or this share of failed requests
    window_s: float = 30.0  # ... among those that ended in this window
    min_requests: int = 10  # ... once the window holds at least this many
    cooldown_s: float = 5.0  # open → half-open
    half_open_probes: int = 1  # requests let through at once while half-open


@dataclass(frozen=True, slots=True)
class Routing:
    """How a request finds a node, and what happens when that node fails it."""

    # Retries on another node while nothing has reached the caller yet (node down, no first
    # token in time, model error).
    max_retries: int = 1
    # Send the request to a second node as well when no first token has come after this long;
    # the first to answer wins, the other is cancelled. 0 turns hedging off.
    hedge_after_s: float = 0.0
    # Send prompts sharing their first N characters to the same node (its prefix cache), unless
    # it has more than `affinity_slack` requests in flight above the least busy node. 0: off.
    prefix_affinity_chars: int = 0
    affinity_slack: int = 4


@dataclass(frozen=True, slots=True)
class Admission:
    """Bounds on the work one orchestrator accepts; past them, RESOURCE_EXHAUSTED (429)."""

    max_concurrent: int = 64  # generations running at once
    max_queue: int = 256  # requests waiting for a slot
    queue_timeout_s: float = 10.0  # longest wait for a slot
    retry_after_s: float = 1.0  # the hint given to refused callers


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One catalog entry: a public model id and the Triton model that serves it."""

    id: str
    triton_model: str
    nodes: tuple[str, ...] = ()  # empty: the orchestrator's default Triton endpoints
    chat_template: str = "chatml"  # builtin name or Jinja2 text
    default_system_prompt: str = ""
    context_window: int = 2048
    default_max_tokens: int = 256
    owned_by: str = "tokenrelay"
    fallback: str = ""  # a catalog model that answers when no node of this one can


@dataclass(frozen=True, slots=True)
class OrchestratorSettings:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"  # Prometheus /metrics over HTTP; "" turns it off
    triton: tuple[str, ...] = ("127.0.0.1:8001",)
    probe_interval_s: float = 1.0
    drain_grace_s: float = 30.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    breaker: Breaker = field(default_factory=Breaker)
    routing: Routing = field(default_factory=Routing)
    admission: Admission = field(default_factory=Admission)
    # TLS of the gRPC API (PEM file paths): certificate and key turn it on; a client CA makes
    # it mutual (callers must present a certificate it signed).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # TLS to Triton (its --grpc-use-ssl): the CA that signed Triton's certificate turns it on;
    # a certificate and key are presented for --grpc-use-ssl-mutual.
    triton_tls_ca: str = ""
    triton_tls_cert: str = ""
    triton_tls_key: str = ""


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    listen: str = "127.0.0.1:8080"
    orchestrator: str = "127.0.0.1:50051"
    max_body_bytes: int = 1024 * 1024
    # Budget of one request when the client states none (OpenAI SDKs send x-stainless-timeout).
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 1.0
    drain_grace_s: float = 10.0
    keepalive_interval_s: float = 15.0  # `: ping` comments on idle SSE streams
    api_keys_file: str = ""  # TOML keys file (see tokenrelay.security); reread when changed
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    # Slow or idle clients: a connection beyond the cap is refused; request headers must arrive
    # within header_timeout_s, a body within body_timeout_s; idle keep-alive connections close.
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    # TLS to the orchestrator (PEM paths): its CA turns TLS on; certificate and key are the
    # edge's client certificate for mutual TLS.
    orchestrator_tls_ca: str = ""
    orchestrator_tls_cert: str = ""
    orchestrator_tls_key: str = ""


_DEFAULT_MODELS = (
    ModelSpec(
        id="smollm2-135m-instruct",
        triton_model="smollm2",
        chat_template="chatml",
        # No system prompt: it scored best on benchmarks/eval (26 of 36 against 21 with
        # SmolLM2's own "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
        default_system_prompt="",
        context_window=2048,
        default_max_tokens=256,
    ),
    ModelSpec(
        id="synthetic",
        triton_model="synthetic",
        chat_template="chatml",
        context_window=4096,
        default_max_tokens=64,
    ),
)


@dataclass(frozen=True, slots=True)
class Embeddings:
    """``[embeddings]``: the embedding model (in Triton) behind retrieval and /v1/embeddings."""

    id: str = "all-minilm-l6-v2"  # the public model id
    triton_model: str = "minilm"
    nodes: tuple[str, ...] = ()  # empty: the orchestrator's default Triton endpoints
    dimensions: int = 384
    max_inputs: int = 256  # texts in one Embed call or /v1/embeddings request
    max_input_chars: int = 20_000  # per text (the model reads its first 256 tokens)
    batch_size: int = 32  # texts per Triton request
    timeout_s: float = 30.0  # one Triton request


@dataclass(frozen=True, slots=True)
class Retrieval:
    """``[retrieval]``: the vector store and the retrieval stage of generation."""

    store: str = "qdrant"  # qdrant, pgvector or none
    # Qdrant: a local on-disk directory (embedded, one process per directory), or a server or
    # cluster by URL (wins over the path). pgvector: TOKENRELAY_POSTGRES_DSN.
    qdrant_path: str = ".run/qdrant"
    qdrant_url: str = ""
    timeout_s: float = 2.0  # the whole stage (embed the question, search) of one request
    on_failure: str = "answer"  # answer (without context, and say so) or fail
    default_top_k: int = 4
    max_top_k: int = 32
    # Chunks less similar to the question than this are left out when a request names no
    # min_score (all-MiniLM-L6-v2: unrelated text scores about 0-0.2, related 0.4 and up).
    min_score: float = 0.2
    # At most this share of the model's context window goes to retrieved chunks; the prompt,
    # max_tokens and a margin are always left room.
    context_share: float = 0.5
    chunk_chars: int = 1000  # ingestion: chunk length
    chunk_overlap: int = 200  # ... and how much consecutive chunks share


@dataclass(frozen=True, slots=True)
class Tracing:
    """``[tracing]``: where each service sends its spans (see tokenrelay.tracing)."""

    exporter: str = "none"  # none, console or otlp (OTLP over HTTP, protobuf)
    endpoint: str = "http://127.0.0.1:4318/v1/traces"


@dataclass(frozen=True, slots=True)
class Secrets:
    """From the environment only (see the module docstring)."""

    internal: Secret | None = None
    api_key: Secret | None = None
    postgres_dsn: Secret | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    orchestrator: OrchestratorSettings = field(default_factory=OrchestratorSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    models: tuple[ModelSpec, ...] = _DEFAULT_MODELS
    log_level: str = "INFO"
    event_loop: str = "auto"  # auto (uvloop when installed), uvloop or asyncio
    tracing: Tracing = field(default_factory=Tracing)
    embeddings: Embeddings = field(default_factory=Embeddings)
    retrieval: Retrieval = field(default_factory=Retrieval)
    secrets: Secrets = field(default_factory=Secrets)

    def nodes_for(self, model: ModelSpec | Embeddings) -> tuple[str, ...]:
        return model.nodes or self.orchestrator.triton


T = TypeVar("T")


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item, _) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a table")
        return _build(typing.cast(type[Any], kind), value, where)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()})


def split_hostport(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; raises ``ValueError`` when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``TOKENRELAY_CONFIG`` (if set) and the environment overrides.

    Raises ``ValueError`` (with the offending key) for a malformed file or value.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = env.get("TOKENRELAY_CONFIG")
    if path:
        with Path(path).open("rb") as handle:
            raw = tomllib.load(handle)
    known = {
        "orchestrator",
        "edge",
        "models",
        "log_level",
        "event_loop",
        "tracing",
        "embeddings",
        "retrieval",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"config: unknown section(s) {', '.join(unknown)}")
    orchestrator = dict(raw.get("orchestrator", {}))
    edge = dict(raw.get("edge", {}))
    tracing = dict(raw.get("tracing", {}))
    if "TOKENRELAY_TRACING" in env:
        tracing["exporter"] = env["TOKENRELAY_TRACING"]
    if "TOKENRELAY_TRACING_ENDPOINT" in env:
        tracing["endpoint"] = env["TOKENRELAY_TRACING_ENDPOINT"]
    if "TOKENRELAY_ORCHESTRATOR_LISTEN" in env:
        orchestrator["listen"] = env["TOKENRELAY_ORCHESTRATOR_LISTEN"]
    if "TOKENRELAY_ORCHESTRATOR_METRICS" in env:
        orchestrator["metrics_listen"] = env["TOKENRELAY_ORCHESTRATOR_METRICS"]
    if "TOKENRELAY_TRITON" in env:
        orchestrator["triton"] = [a.strip() for a in env["TOKENRELAY_TRITON"].split(",") if a]
    retrieval = dict(raw.get("retrieval", {}))
    for variable, key in (
        ("TOKENRELAY_VECTOR_STORE", "store"),
        ("TOKENRELAY_QDRANT_PATH", "qdrant_path"),
        ("TOKENRELAY_QDRANT_URL", "qdrant_url"),
    ):
        if variable in env:
            retrieval[key] = env[variable]
    if "TOKENRELAY_EDGE_LISTEN" in env:
        edge["listen"] = env["TOKENRELAY_EDGE_LISTEN"]
    if "TOKENRELAY_EDGE_ORCHESTRATOR" in env:
        edge["orchestrator"] = env["TOKENRELAY_EDGE_ORCHESTRATOR"]
    settings = Settings(
        orchestrator=_build(OrchestratorSettings, orchestrator, "orchestrator"),
        edge=_build(EdgeSettings, edge, "edge"),
        models=(
            _coerce(raw["models"], tuple[ModelSpec, ...], "models")
            if "models" in raw
            else _DEFAULT_MODELS
        ),
        log_level=str(env.get("TOKENRELAY_LOG_LEVEL", raw.get("log_level", "INFO"))).upper(),
        event_loop=str(env.get("TOKENRELAY_EVENT_LOOP", raw.get("event_loop", "auto"))),
        tracing=_build(Tracing, tracing, "tracing"),
        embeddings=_build(Embeddings, raw.get("embeddings", {}), "embeddings"),
        retrieval=_build(Retrieval, retrieval, "retrieval"),
        secrets=_secrets(env),
    )
    _check(settings)
    return settings


def _secrets(env: Mapping[str, str]) -> Secrets:
    internal = env.get("TOKENRELAY_INTERNAL_SECRET", "")
    if not internal and env.get("TOKENRELAY_INTERNAL_SECRET_FILE"):
        internal = Path(env["TOKENRELAY_INTERNAL_SECRET_FILE"]).read_text().strip()
    api_key = env.get("TOKENRELAY_API_KEY", "")
    dsn = env.get("TOKENRELAY_POSTGRES_DSN", "")
    return Secrets(
        internal=Secret(internal) if internal else None,
        api_key=Secret(api_key) if api_key else None,
        postgres_dsn=Secret(dsn) if dsn else None,
    )


def check_exposure(settings: Settings, service: str) -> None:
    """Refuse to serve beyond loopback without credentials (``service``: edge or orchestrator).

    Raises ``ValueError`` saying what to set.
    """
    if service == "edge":
        host, _ = split_hostport(settings.edge.listen)
        if not is_loopback(host) and not (settings.edge.api_keys_file or settings.secrets.api_key):
            raise ValueError(
                f"edge: listening on {settings.edge.listen} with no API keys; set"
                " edge.api_keys_file or TOKENRELAY_API_KEY"
            )
    else:
        orchestrator = settings.orchestrator
        host, _ = split_hostport(orchestrator.listen)
        mutual = bool(orchestrator.tls_client_ca)
        if not is_loopback(host) and not (settings.secrets.internal or mutual):
            raise ValueError(
                f"orchestrator: listening on {orchestrator.listen} with no internal secret; set"
                " TOKENRELAY_INTERNAL_SECRET (edge and orchestrator) or mutual TLS"
            )


def _check(settings: Settings) -> None:
    ids = [m.id for m in settings.models]
    if len(set(ids)) != len(ids):
        raise ValueError("models: duplicate model id")
    if settings.event_loop not in {"auto", "uvloop", "asyncio"}:
        raise ValueError(f"event_loop: auto, uvloop or asyncio, not {settings.event_loop!r}")
    if settings.tracing.exporter not in {"none", "console", "otlp"}:
        raise ValueError(
            f"tracing.exporter: none, console or otlp, not {settings.tracing.exporter!r}"
        )
    if settings.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"log_level: unknown level {settings.log_level!r}")
    for model in settings.models:
        if model.context_window < 1 or not 1 <= model.default_max_tokens <= model.context_window:
            raise ValueError(f"models.{model.id}: default_max_tokens must fit the context window")
        if not settings.nodes_for(model):
            raise ValueError(f"models.{model.id}: no Triton nodes")
        if model.fallback and (model.fallback == model.id or model.fallback not in ids):
            raise ValueError(f"models.{model.id}: fallback must name another catalog model")
    retrieval, embeddings = settings.retrieval, settings.embeddings
    if retrieval.store not in {"qdrant", "pgvector", "none"}:
        raise ValueError(f"retrieval.store: qdrant, pgvector or none, not {retrieval.store!r}")
    if retrieval.store == "pgvector" and settings.secrets.postgres_dsn is None:
        raise ValueError("retrieval.store = pgvector needs TOKENRELAY_POSTGRES_DSN")
    if retrieval.on_failure not in {"answer", "fail"}:
        raise ValueError(f"retrieval.on_failure: answer or fail, not {retrieval.on_failure!r}")
    if not -1 <= retrieval.min_score <= 1:
        raise ValueError("retrieval.min_score: must be in [-1, 1]")
    if not 1 <= retrieval.default_top_k <= retrieval.max_top_k:
        raise ValueError("retrieval: 1 ≤ default_top_k ≤ max_top_k")
    if not 0 < retrieval.context_share <= 1 or retrieval.timeout_s <= 0:
        raise ValueError("retrieval: context_share in (0, 1] and timeout_s > 0")
    if not 0 <= retrieval.chunk_overlap < retrieval.chunk_chars:
        raise ValueError("retrieval: 0 ≤ chunk_overlap < chunk_chars")
    if embeddings.dimensions < 1 or embeddings.batch_size < 1 or embeddings.max_inputs < 1:
        raise ValueError("embeddings: dimensions, batch_size and max_inputs must be at least 1")
    orchestrator = settings.orchestrator
    breaker, admission = orchestrator.breaker, orchestrator.admission
    if breaker.failure_threshold < 1 or breaker.half_open_probes < 1 or breaker.min_requests < 1:
        raise ValueError("orchestrator.breaker: thresholds must be at least 1")
    if not 0 < breaker.failure_rate <= 1:
        raise ValueError("orchestrator.breaker.failure_rate: must be in (0, 1]")
    if admission.max_concurrent < 1 or admission.max_queue < 0:
        raise ValueError("orchestrator.admission: max_concurrent ≥ 1 and max_queue ≥ 0")
    if orchestrator.routing.max_retries < 0 or orchestrator.routing.hedge_after_s < 0:
        raise ValueError("orchestrator.routing: max_retries and hedge_after_s must be ≥ 0")
    for address in (settings.orchestrator.listen, settings.edge.listen, settings.edge.orchestrator):
        split_hostport(address)
    if orchestrator.metrics_listen:
        split_hostport(orchestrator.metrics_listen)
    for section, cert, key in (
        ("orchestrator", orchestrator.tls_cert, orchestrator.tls_key),
        ("edge", settings.edge.orchestrator_tls_cert, settings.edge.orchestrator_tls_key),
        ("orchestrator", orchestrator.triton_tls_cert, orchestrator.triton_tls_key),
    ):
        if bool(cert) != bool(key):
            raise ValueError(
                f"{section}: a TLS certificate needs its key, and a key its certificate"
            )
    if orchestrator.tls_client_ca and not orchestrator.tls_cert:
        raise ValueError("orchestrator: tls_client_ca needs tls_cert and tls_key")
