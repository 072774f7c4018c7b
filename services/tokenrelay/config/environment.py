"""The one registry of environment variables (as vLLM's ``envs.py``): each row names a variable,
the setting it overrides, how its text becomes a value, and what it means. ``load_settings``
applies the rows and the README's table of variables is this table (a test keeps them equal);
nothing else in the services reads a ``TOKENRELAY_*`` variable.

An override wins over the file and is checked like the file's value, and an error names the
variable. Where two variables set one value, the first in the table that is set wins. Rows whose
setting is under ``secrets.`` are the only source of their value (the file may not name them);
an empty secret counts as unset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenrelay.security import Secret


def _text(value: str) -> str:
    return value


def _addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


def _file(value: str) -> str:
    return Path(value).read_text().strip()


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable: ``setting`` is the dotted path it overrides ("" for the one
    that names the file), ``parse`` turns its text into the value (it may raise ``OSError`` or
    ``ValueError``), ``doc`` is its line of the README's table (Markdown)."""

    name: str
    setting: str
    doc: str
    parse: Callable[[str], Any] = _text

    @property
    def secret(self) -> bool:
        return self.setting.startswith("secrets.")


CONFIG = "TOKENRELAY_CONFIG"

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(
        CONFIG,
        "",
        "path of the TOML file (unset: built-in defaults, the same as `tokenrelay.toml`)",
    ),
    EnvVar(
        "TOKENRELAY_ORCHESTRATOR_LISTEN",
        "orchestrator.listen",
        "orchestrator gRPC address, `host:port`",
    ),
    EnvVar(
        "TOKENRELAY_ORCHESTRATOR_FRAMES",
        "orchestrator.frames_listen",
        'orchestrator `GenerateStream` as frames, loopback `host:port` (`""`: off)',
    ),
    EnvVar(
        "TOKENRELAY_ORCHESTRATOR_METRICS",
        "orchestrator.metrics_listen",
        'orchestrator `/metrics` address (`""`: off)',
    ),
    EnvVar(
        "TOKENRELAY_ORCHESTRATOR_HEALTH",
        "orchestrator.health_listen",
        'orchestrator HTTP `/healthz` and `/readyz` address (`""`: off)',
    ),
    EnvVar(
        "TOKENRELAY_TRITON",
        "orchestrator.triton",
        "comma-separated Triton gRPC endpoints for models that name no `nodes`",
        _addresses,
    ),
    EnvVar("TOKENRELAY_EDGE_LISTEN", "edge.listen", "edge HTTP address, `host:port`"),
    EnvVar(
        "TOKENRELAY_EDGE_HEALTH",
        "edge.health_listen",
        'the edge\'s own `/healthz` and `/readyz` address (`""`: off)',
    ),
    EnvVar(
        "TOKENRELAY_EDGE_ORCHESTRATOR",
        "edge.orchestrator",
        "the orchestrator the edge calls, `host:port`",
    ),
    EnvVar(
        "TOKENRELAY_EDGE_ORCHESTRATOR_FRAMES",
        "edge.orchestrator_frames",
        'the orchestrator\'s `frames_listen` for generations (`""`: gRPC for all)',
    ),
    EnvVar("TOKENRELAY_LOG_LEVEL", "log_level", "`DEBUG`, `INFO`, `WARNING` or `ERROR` (any case)"),
    EnvVar(
        "TOKENRELAY_EVENT_LOOP",
        "event_loop",
        "`auto` (uvloop when installed), `uvloop` or `asyncio`",
    ),
    EnvVar("TOKENRELAY_TRACING", "tracing.exporter", "trace exporter: `none`, `console` or `otlp`"),
    EnvVar("TOKENRELAY_TRACING_ENDPOINT", "tracing.endpoint", "the OTLP/HTTP traces endpoint"),
    EnvVar("TOKENRELAY_VECTOR_STORE", "retrieval.store", "`qdrant`, `pgvector` or `none`"),
    EnvVar(
        "TOKENRELAY_QDRANT_PATH", "retrieval.qdrant_path", "Qdrant's embedded on-disk directory"
    ),
    EnvVar(
        "TOKENRELAY_QDRANT_URL",
        "retrieval.qdrant_url",
        "a Qdrant server or cluster (wins over the path)",
    ),
    EnvVar(
        "TOKENRELAY_API_KEY",
        "secrets.api_key",
        "one API key the edge accepts (id `env`), besides `edge.api_keys_file`",
    ),
    EnvVar(
        "TOKENRELAY_INTERNAL_SECRET", "secrets.internal", "the edge → orchestrator shared secret"
    ),
    EnvVar(
        "TOKENRELAY_INTERNAL_SECRET_FILE",
        "secrets.internal",
        "... or a file holding it (e.g. a mounted Kubernetes secret)",
        _file,
    ),
    EnvVar(
        "TOKENRELAY_POSTGRES_DSN",
        "secrets.postgres_dsn",
        "PostgreSQL connection string for pgvector and the usage ledger (it may hold a password)",
    ),
    EnvVar(
        "TOKENRELAY_REDIS_URL",
        "secrets.redis_url",
        "the shared limits store, `redis://[:password@]host:6379/0` (`tenancy.store = redis`)",
    ),
)


def overrides(environ: Mapping[str, str]) -> dict[str, tuple[EnvVar, Any]]:
    """The settings the variables of ``environ`` set: dotted path → (variable, parsed value),
    secrets included (wrapped in ``Secret``). Raises ``ValueError`` naming the variable whose
    text does not parse or whose file cannot be read."""
    found: dict[str, tuple[EnvVar, Any]] = {}
    for var in ENVIRONMENT:
        if not var.setting or var.setting in found or var.name not in environ:
            continue
        if var.secret and not environ[var.name]:
            continue
        try:
            value = var.parse(environ[var.name])
        except (OSError, ValueError) as exc:
            raise ValueError(f"{var.name}: {exc}") from None
        if var.secret:
            if not value:
                continue
            value = Secret(value)
        found[var.setting] = (var, value)
    return found


def markdown_table() -> str:
    """The README's table of variables (Markdown), one row per variable."""
    rows = ["| variable | setting | meaning |", "|---|---|---|"]
    for var in ENVIRONMENT:
        if var.secret:
            setting = "secret: environment only"
        else:
            setting = f"`{var.setting}`" if var.setting else "the file itself"
        rows.append(f"| `{var.name}` | {setting} | {var.doc} |")
    return "\n".join(rows) + "\n"
