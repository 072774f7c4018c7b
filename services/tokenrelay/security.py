"""Credentials: API keys for the edge, the shared secret of the internal hop, TLS material.

API keys are random tokens (``tr-`` + 43 URL-safe characters, 256 bits). Only their SHA-256
digests are stored: for tokens that random a slow password hash adds nothing, and a digest lets
the edge check a key without keeping it. A presented key is hashed and compared with every stored
digest in constant time (``hmac.compare_digest``, no early exit), so timing says nothing about
which key, or how much of one, matched. Logs name a key by its id, never by the key.

The keys file is TOML, reread when it changes (so a key is revoked without a restart)::

    [[keys]]
    id = "alice-laptop"             # shown in logs
    owner = "Alice <alice@example.com>"
    sha256 = "5c1f…"                # tokenrelay-keys new prints it with the key
    requests_per_minute = 60        # 0: no limit
    max_streams = 4                 # concurrent requests (a resumable stream's generation
                                    # counts until it ends, its client gone or not); 0: none
    revoked = false
    tier = "standard"               # [[tenancy.tiers]]: priority, weight, token limits
                                    # (empty or unknown: tenancy.default_tier)
    tokens_per_minute = 10000       # optional: the key's own, instead of its tier's (0: none)
    token_budget = 1000000          # optional: the key's own budget per period (0: none)

With a shared store (``tenancy.store = "redis"``) the limits hold across every replica; without
one, each edge process counts for itself. The orchestrator's ``clients_file`` has the same format
for gRPC clients, whose entries may name ``san``: the subject alternative name (URI or DNS) of the
client's mTLS certificate, which then identifies it without a token; the orchestrator holds them
to their entry's limits.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import secrets
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ApiKey",
    "KeyStore",
    "Secret",
    "hash_key",
    "is_loopback",
    "new_key",
]


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string that never shows itself in a repr or a log line."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    def matches(self, presented: str) -> bool:
        return hmac.compare_digest(self.value.encode(), presented.encode())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "tr-" + secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    owner: str = ""
    sha256: str = ""
    requests_per_minute: int = 0
    max_streams: int = 0
    revoked: bool = False
    tier: str = ""
    tokens_per_minute: int | None = None  # None: the tier's
    token_budget: int | None = None  # None: the tier's
    san: str = ""  # clients file: the mTLS certificate's subject alternative name


def _load(path: Path) -> tuple[ApiKey, ...]:
    with path.open("rb") as handle:
        table = tomllib.load(handle)
    unknown = set(table) - {"keys"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    keys = []
    fields = set(ApiKey.__dataclass_fields__)
    for i, entry in enumerate(table.get("keys", [])):
        extra = set(entry) - fields
        if extra or "id" not in entry or "sha256" not in entry:
            raise ValueError(f"{path}: keys[{i}] needs id and sha256 (unknown: {sorted(extra)})")
        for name in ("requests_per_minute", "max_streams", "tokens_per_minute", "token_budget"):
            value = entry.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{path}: keys[{i}].{name} must be a whole number ≥ 0")
        for name in ("id", "owner", "tier", "san"):
            if not isinstance(entry.get(name, ""), str):
                raise ValueError(f"{path}: keys[{i}].{name} must be a string")
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: keys[{i}].sha256 is not a SHA-256 hex digest")
        keys.append(ApiKey(**{**entry, "sha256": digest}))
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate key id")
    return tuple(keys)


class KeyStore:
    """The accepted keys: from a keys file (reread when it changes) and/or one environment key."""

    def __init__(
        self,
        path: Path | None = None,
        env_key: Secret | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._env = (
            ApiKey("env", "TOKENRELAY_API_KEY", hash_key(env_key.value)) if env_key else None
        )
        self._clock = clock
        # Fixed for the store's life (keys or not), so asked once per request at no cost.
        self.enabled = path is not None or env_key is not None
        self._keys: tuple[ApiKey, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        if path is not None:
            self.reload()

    def reload(self) -> None:
        """Reread the keys file if it changed; a broken file keeps the previous keys."""
        if self._path is None:
            return
        stat = self._path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._keys = _load(self._path)
            self._stamp = stamp

    def maybe_reload(self, every_s: float = 1.0) -> bool:
        """Whether a reload is due (at most once per ``every_s``); the caller runs ``reload``
        off the event loop."""
        now = self._clock()
        if self._path is None or now - self._checked < every_s:
            return False
        self._checked = now
        return True

    def find_san(self, names: set[str]) -> ApiKey | None:
        """The key whose ``san`` is one of ``names`` (a client certificate's), or None."""
        for key in self._keys:
            if key.san and key.san in names:
                return key
        return None

    def find(self, presented: str) -> ApiKey | None:
        """The key matching ``presented`` (revoked ones included), or None."""
        digest = hash_key(presented).encode()
        found = None
        for key in (*self._keys, *((self._env,) if self._env else ())):
            if hmac.compare_digest(digest, key.sha256.encode()) and found is None:
                found = key  # no early exit: every digest is compared
        return found


def main(argv: list[str] | None = None) -> None:
    """``tokenrelay-keys new --id ID [--owner ...] [--rpm N] [--streams N]``: print a new key
    (shown once) and the TOML entry to append to the keys file."""
    parser = argparse.ArgumentParser(prog="tokenrelay-keys", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("new", help="make a key")
    create.add_argument("--id", required=True)
    create.add_argument("--owner", default="")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    create.add_argument("--streams", type=int, default=0, help="concurrent requests (0: none)")
    create.add_argument("--tier", default="", help="its tier (tenancy.tiers; empty: the default)")
    args = parser.parse_args(argv)
    key = new_key()
    print(f"# the key (shown once; give it to its owner): {key}", file=sys.stderr)
    print(
        f'\n[[keys]]\nid = "{args.id}"\nowner = "{args.owner}"\nsha256 = "{hash_key(key)}"\n'
        f"requests_per_minute = {args.rpm}\nmax_streams = {args.streams}\nrevoked = false"
        + (f'\ntier = "{args.tier}"' if args.tier else "")
    )


if __name__ == "__main__":
    main()
