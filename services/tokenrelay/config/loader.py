"""Reading and writing settings: the TOML file plus environment overrides → ``Settings``
(``load_settings``), and ``Settings`` → TOML text that reads back equal (``to_toml``).

pydantic checks the file against the dataclasses (strict types, bounds, the checks beside the
fields); its errors are reworded here into one line per problem that names the key's path (and
the variable, for an override), e.g. ``orchestrator.lisen: unknown key (did you mean listen?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from tokenrelay.config.environment import CONFIG, ENVIRONMENT, overrides
from tokenrelay.config.secrets import Secrets
from tokenrelay.config.settings import Settings

_ADAPTER = TypeAdapter(Settings)


class ConfigError(ValueError):
    """Settings that cannot be used; the message names each offending key (and variable)."""


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the file ``TOKENRELAY_CONFIG`` names (unset: the defaults) and
    the environment overrides of ``tokenrelay.config.environment`` (``environ``: default
    ``os.environ``). Reads the environment and the files it names, nothing else.

    Raises ``ConfigError`` (a ``ValueError``) naming every bad key or variable, ``OSError`` when
    the file cannot be read.
    """
    env = os.environ if environ is None else environ
    path = env.get(CONFIG, "")
    raw = _read(path) if path else {}
    if "secrets" in raw:
        names = ", ".join(v.name for v in ENVIRONMENT if v.secret)
        raise ConfigError(f"secrets: set them in the environment ({names}), not in the file")
    try:
        found = overrides(env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    secrets: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for setting, (var, value) in found.items():
        if var.secret:
            secrets[setting.removeprefix("secrets.")] = value
        else:
            _put(raw, setting, value)
            origins[setting] = var.name
    try:
        # Through JSON: in pydantic's JSON mode a strict schema still takes tables for
        # dataclasses and arrays for tuples, and TOML's values are JSON's (dates aside, which
        # become strings that no field accepts).
        settings = _ADAPTER.validate_json(json.dumps(raw, default=str))
    except ValidationError as exc:
        problems = [_explain(error, origins) for error in exc.errors(include_url=False)]
        raise ConfigError("; ".join(problems)) from None
    if secrets:
        settings = dataclasses.replace(settings, secrets=Secrets(**secrets))
    if settings.retrieval.store == "pgvector" and settings.secrets.postgres_dsn is None:
        raise ConfigError("retrieval.store = pgvector needs TOKENRELAY_POSTGRES_DSN")
    if settings.tenancy.store == "redis" and settings.secrets.redis_url is None:
        raise ConfigError("tenancy.store = redis needs TOKENRELAY_REDIS_URL")
    if settings.tenancy.ledger == "postgres" and settings.secrets.postgres_dsn is None:
        raise ConfigError("tenancy.ledger = postgres needs TOKENRELAY_POSTGRES_DSN")
    return settings


def to_toml(settings: Settings) -> str:
    """``settings`` as TOML, every key written out, which ``load_settings`` reads back equal.
    Secrets are left out: they come from the environment only."""
    header = "# Written by tokenrelay.config.to_toml; secrets come from the environment.\n"
    return header + tomli_w.dumps(_table(settings))


def _read(path: str) -> dict[str, Any]:
    with Path(path).open("rb") as handle:
        try:
            return tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _put(raw: dict[str, Any], setting: str, value: Any) -> None:
    *tables, key = setting.split(".")
    table = raw
    for name in tables:
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            return  # the file's own value is wrong there, and is reported as such
    table[key] = value


def _table(section: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if not isinstance(value, Secrets):
            table[f.name] = _value(value)
    return table


def _value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _table(value)
    if isinstance(value, tuple):
        return [_value(v) for v in value]
    return value


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "tuple_type": "an array",
    "dataclass_type": "a table",
}


_SHOULD = re.compile(r"^\w+ should ")  # pydantic's "Input should be ..." → "must be ..."


def _explain(error: ErrorDetails, origins: Mapping[str, str]) -> str:
    loc = error["loc"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, value = error["type"], error.get("input")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        what = "unknown section" if len(loc) == 1 and isinstance(value, dict) else "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(loc[:-1]), n=1)
        problem = f"{what} (did you mean {close[0]}?)" if close else what
    elif kind in _EXPECTED:
        problem = f"expected {_EXPECTED[kind]}, got {shown}"
    elif kind == "literal_error":
        problem = f"expected {error.get('ctx', {}).get('expected', 'another value')}, got {shown}"
    elif kind == "value_error":
        problem = str(error.get("ctx", {}).get("error", error["msg"]))
    elif kind in ("missing_argument", "missing"):
        problem = "required, and missing"
    else:
        problem = f"{_SHOULD.sub('must ', error['msg'])}, got {shown}"
    origin = next(
        (name for s, name in origins.items() if path == s or path.startswith((f"{s}.", f"{s}["))),
        None,
    )
    where = f"{path} (from {origin})" if origin else path
    return f"{where}: {problem}" if where else problem


def _keys_at(loc: Sequence[int | str]) -> list[str]:
    """The keys the table at ``loc`` may hold (for a did-you-mean); none where it is unclear."""
    kind: Any = Settings
    for part in loc:
        if isinstance(part, int):  # an entry of an array of tables: tuple[ModelSpec, ...]
            args = typing.get_args(kind)
            kind = args[0] if args else None
        else:
            fields = getattr(kind, "__pydantic_fields__", {})
            kind = fields[part].annotation if part in fields else None
    return list(getattr(kind, "__pydantic_fields__", {}))
