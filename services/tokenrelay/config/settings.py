"""``Settings``: every section together, the checks that span sections, and the exposure check
each service runs before it listens."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import BeforeValidator
from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION, parse_dns, split_hostport
from tokenrelay.config.edge import EdgeSettings
from tokenrelay.config.embeddings import Embeddings
from tokenrelay.config.models import DEFAULT_MODELS, ModelSpec
from tokenrelay.config.orchestrator import OrchestratorSettings
from tokenrelay.config.retrieval import Retrieval
from tokenrelay.config.secrets import Secrets
from tokenrelay.config.tenancy import Tenancy
from tokenrelay.config.tracing import Tracing
from tokenrelay.security import is_loopback

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
EventLoop = Literal["auto", "uvloop", "asyncio"]


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


@dataclass(frozen=True, slots=True, config=SECTION)
class Settings:
    """The whole configuration of a service: the TOML file's sections, environment overrides
    and secrets (see ``tokenrelay.config``). Every field is checked when it is built, so a
    ``Settings`` is valid however it was made (loaded, constructed or ``dataclasses.replace``d);
    only what needs the environment (a DSN for pgvector) is checked by ``load_settings``."""

    orchestrator: OrchestratorSettings = field(default_factory=OrchestratorSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    models: tuple[ModelSpec, ...] = DEFAULT_MODELS
    """The catalog; ids are unique, a fallback names another entry, every model has nodes."""
    log_level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    """DEBUG, INFO, WARNING or ERROR (any case)."""
    event_loop: EventLoop = "auto"
    """auto (uvloop when installed), uvloop or asyncio."""
    tracing: Tracing = field(default_factory=Tracing)
    embeddings: Embeddings = field(default_factory=Embeddings)
    retrieval: Retrieval = field(default_factory=Retrieval)
    tenancy: Tenancy = field(default_factory=Tenancy)
    secrets: Secrets = field(default_factory=Secrets)
    """From the environment only; ``to_toml`` leaves it out and the file may not name it."""

    def nodes_for(self, model: ModelSpec | Embeddings) -> tuple[str, ...]:
        """The Triton endpoints of ``model``: its own, else ``orchestrator.triton``."""
        return model.nodes or self.orchestrator.triton

    def __post_init__(self) -> None:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate model id {', '.join(map(repr, duplicates))}")
        for entry in self.embeddings.nodes:
            if entry.startswith("dns:"):
                raise ValueError("embeddings.nodes: host:port entries only (dns: is for models)")
        for model in self.models:
            for entry in self.nodes_for(model):
                parse_dns(entry)  # ValueError when a dns: entry is malformed
            if not self.nodes_for(model):
                raise ValueError(
                    f"models: {model.id!r} has no Triton nodes (its nodes and"
                    " orchestrator.triton are both empty)"
                )
            if model.fallback and model.fallback not in ids:
                raise ValueError(
                    f"models: {model.id!r}: fallback must name another catalog model,"
                    f" not {model.fallback!r}"
                )


def check_exposure(settings: Settings, service: str) -> None:
    """Refuse to serve beyond loopback without credentials (``service``: edge or orchestrator).

    Raises ``ValueError`` saying what to set.
    """
    frames = (
        settings.edge.orchestrator_frames
        if service == "edge"
        else settings.orchestrator.frames_listen
    )
    if frames and not is_loopback(split_hostport(frames)[0]):
        name = "edge.orchestrator_frames" if service == "edge" else "orchestrator.frames_listen"
        raise ValueError(
            f"{name} = {frames!r}: frames have no TLS, so the address must be loopback"
            " (127.0.0.1, ::1, localhost); use gRPC (with TLS) between hosts"
        )
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
