"""Secrets: from the environment only (``TOKENRELAY_*`` variables marked secret in
``tokenrelay.config.environment``), never from the TOML file; they never show in a repr."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION
from tokenrelay.security import Secret


@dataclass(frozen=True, slots=True, config=SECTION)
class Secrets:
    """What the services must not read from a file that may be shared or committed."""

    internal: Secret | None = None
    """The shared secret of the edge → orchestrator hop."""
    api_key: Secret | None = None
    """One API key the edge accepts (id ``env``), besides ``edge.api_keys_file``."""
    postgres_dsn: Secret | None = None
    """pgvector's and the usage ledger's PostgreSQL connection string (it may hold a password)."""
    redis_url: Secret | None = None
    """The shared limits store (``tenancy.store = "redis"``; it may hold a password)."""
