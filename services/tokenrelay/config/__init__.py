"""Settings: one TOML file, environment overrides, frozen typed objects.

Read once, in a service's ``__main__`` (``load_settings``), and passed to constructors; nothing
else reads the environment. One module per section, each a frozen slotted dataclass (pydantic's,
as vLLM's ``vllm/config/*``) whose fields carry their type (``Literal`` where there are a few
values), bounds and checks, and a docstring under each field:

- ``orchestrator``: ``[orchestrator]`` with ``.timeouts``, ``.limits``, ``.breaker``,
  ``.routing``, ``.admission`` and ``.continuation``;
- ``models``: ``[[models]]``, the catalog (``ModelSpec``);
- ``edge``: ``[edge]`` with ``.resume`` and ``.websocket``;
- ``embeddings``, ``retrieval``, ``tracing``: their sections;
- ``tenancy``: ``[tenancy]`` and its ``[[tenancy.tiers]]``;
- ``secrets``: from the environment only, never from the file, never in a repr;
- ``settings``: ``Settings`` (all of them, and the checks that span sections);
- ``environment``: the one registry of ``TOKENRELAY_*`` variables, which the README's table of
  variables is kept equal to;
- ``loader``: ``load_settings`` and ``to_toml``.

``tokenrelay.toml`` at the repository root lists every key with its default (a test keeps it
equal to the defaults). Unknown keys are errors, so a typo never goes unnoticed; every error
names the key's path. Checks run whenever a section is built, so a ``Settings`` made in code
(``dataclasses.replace`` on the defaults, say) is as valid as a loaded one, and ``to_toml``
writes it for a process to load. Adding a setting is one field (with its docstring) in its
section's module; an environment variable for it is one row in ``environment.ENVIRONMENT``.

Secrets come only from the environment (or a file it names). A service that listens beyond
loopback refuses to start without them (``check_exposure``): the edge without API keys, the
orchestrator without the internal secret or mutual TLS.
"""

from tokenrelay.config._fields import DnsName, join_hostport, parse_dns, split_hostport
from tokenrelay.config.edge import EdgeSettings, Resume, WebSocket
from tokenrelay.config.embeddings import Embeddings
from tokenrelay.config.environment import ENVIRONMENT, EnvVar
from tokenrelay.config.loader import ConfigError, load_settings, to_toml
from tokenrelay.config.models import ModelSpec
from tokenrelay.config.orchestrator import (
    Admission,
    Breaker,
    Continuation,
    Discovery,
    Limits,
    OrchestratorSettings,
    Routing,
    Timeouts,
)
from tokenrelay.config.retrieval import Retrieval
from tokenrelay.config.secrets import Secrets
from tokenrelay.config.settings import Settings, check_exposure
from tokenrelay.config.tenancy import Tenancy, Tier
from tokenrelay.config.tracing import Tracing

__all__ = [
    "ENVIRONMENT",
    "Admission",
    "Breaker",
    "ConfigError",
    "Continuation",
    "Discovery",
    "DnsName",
    "EdgeSettings",
    "Embeddings",
    "EnvVar",
    "Limits",
    "ModelSpec",
    "OrchestratorSettings",
    "Resume",
    "Retrieval",
    "Routing",
    "Secrets",
    "Settings",
    "Tenancy",
    "Tier",
    "Timeouts",
    "Tracing",
    "WebSocket",
    "check_exposure",
    "join_hostport",
    "load_settings",
    "parse_dns",
    "split_hostport",
    "to_toml",
]
