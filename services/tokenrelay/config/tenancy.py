"""``[tenancy]`` and ``[[tenancy.tiers]]``: identities, priorities, token budgets, the shared
limits store and the usage ledger (see ``tokenrelay.tenancy``)."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from tokenrelay.config._fields import SECTION, AtLeastOne, AtLeastZero, Name, Seconds

Priority = Literal["low", "normal", "high"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")  # lowest first


@dataclass(frozen=True, slots=True, config=SECTION)
class Tier:
    """What the keys of one tier get. A key names its tier (keys file ``tier``; empty or
    unknown: ``default_tier``) and may override its token limits in its own entry."""

    name: Name
    priority: Priority = "normal"
    """The admission class of its requests: a waiting request of a higher class always goes
    first, and the lowest class is shed first when the queue is full."""
    max_priority: Priority = "normal"
    """The highest class a request may ask for (``X-TokenRelay-Priority``,
    ``x-tokenrelay-priority``); a higher ask is capped, not refused."""
    weight: AtLeastOne = 1
    """Its keys' share of the slots among the busy keys of the same class."""
    tokens_per_minute: AtLeastZero = 0
    """Per key, prompt and completion together, counted as they are generated; 0: no limit."""
    token_budget: AtLeastZero = 0
    """Per key and ``budget_period``; 0: none. A spent budget is 429 ``insufficient_quota``."""
    budget_period: Literal["day", "month"] = "day"
    """UTC."""

    def __post_init__(self) -> None:
        if PRIORITIES.index(self.priority) > PRIORITIES.index(self.max_priority):
            raise ValueError(
                f"tier {self.name!r}: priority ({self.priority}) must not be above max_priority"
                f" ({self.max_priority})"
            )


DEFAULT_TIERS = (Tier("standard"),)


@dataclass(frozen=True, slots=True, config=SECTION)
class Tenancy:
    """``[tenancy]``."""

    store: Literal["local", "redis"] = "local"
    """Where keys' limits are counted. local: in each process (N replicas, or workers, let a
    key do N times its limits); redis: one Redis (``TOKENRELAY_REDIS_URL``), so that every
    limit holds across all replicas."""
    on_store_failure: Literal["open", "closed"] = "open"
    """When the store cannot be reached: open (each process counts for itself, with a warning)
    or closed (refuse with 503 until it is back)."""
    store_timeout_s: Seconds = 0.5
    """One call to the store."""
    store_retry_s: Seconds = 1.0
    """After a failure: how long to leave the store alone before trying it again."""
    tiers: tuple[Tier, ...] = DEFAULT_TIERS
    default_tier: Name = "standard"
    """The tier of keys that name none (or one that does not exist)."""
    metered_keys: tuple[str, ...] = ()
    """Key ids with metric series of their own; every other key is counted as ``other``."""
    token_chunk: AtLeastOne = 64
    """Tokens a stream reserves from the store at a time (one store call per chunk)."""
    ledger: Literal["none", "postgres"] = "none"
    """postgres: usage per key, model and day in ``TOKENRELAY_POSTGRES_DSN``'s database."""
    ledger_flush_s: Seconds = 1.0
    """How often the ledger writes its batch."""
    ledger_max_rows: AtLeastOne = 10_000
    """Rows waiting for a write; past it, usage for a new row is dropped (and counted)."""

    def __post_init__(self) -> None:
        names = [t.name for t in self.tiers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tiers: duplicate name {', '.join(map(repr, duplicates))}")
        if self.default_tier not in names:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers")

    def tier(self, name: str) -> Tier:
        """The tier called ``name``, or the default tier when there is none of that name."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return next(t for t in self.tiers if t.name == self.default_tier)
