"""Who a request is for: the caller's identity, resolved against the tiers of the configuration.

The edge knows its callers by API key; it forwards the key's *id* (never the key), its tier and its
own token limits on the internal hop, as one metadata entry (``x-tokenrelay-caller``, a URL query
string), and a request's asked-for priority as ``x-tokenrelay-priority``. The orchestrator believes
a forwarded identity only from a caller it trusts to forward (the internal secret's holder; see
``orchestrator/_border.py``, ``CallerInterceptor``); gRPC clients with identities of their own are
known by their token or certificate instead.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from tokenrelay.config import Tenancy, Tier

__all__ = [
    "ANONYMOUS",
    "CALLER_HEADER",
    "PRIORITY_HEADER",
    "Caller",
    "Identity",
    "Priority",
    "Tenants",
    "current_caller",
    "forwarded_metadata",
]

CALLER_HEADER = "x-tokenrelay-caller"
PRIORITY_HEADER = "x-tokenrelay-priority"
ANONYMOUS = "anonymous"
_MAX_ID_CHARS = 128


class Priority(enum.IntEnum):
    """Admission classes: a waiting request of a higher class is always admitted first, and the
    lowest class is shed first when the queue is full."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, text: str) -> Priority | None:
        """``low``/``normal``/``high`` (any case), else None."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            return None


@dataclass(frozen=True, slots=True)
class Caller:
    """What a caller's credentials say: its id, its tier's name, its own token limits (``None``:
    the tier's), and the priority a request asked for (``None``: the tier's default)."""

    key_id: str = ANONYMOUS
    tier: str = ""
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    priority: Priority | None = None

    def encode(self) -> str:
        """The ``x-tokenrelay-caller`` value (the priority travels on its own header)."""
        fields: dict[str, str] = {"id": self.key_id}
        if self.tier:
            fields["tier"] = self.tier
        if self.tokens_per_minute is not None:
            fields["tpm"] = str(self.tokens_per_minute)
        if self.token_budget is not None:
            fields["budget"] = str(self.token_budget)
        return urlencode(fields)

    @classmethod
    def decode(cls, value: str) -> Caller | None:
        """The caller a ``x-tokenrelay-caller`` value names, or None when it is malformed."""
        fields = dict(parse_qsl(value, keep_blank_values=True))
        key_id = fields.get("id", "")
        if not key_id or len(key_id) > _MAX_ID_CHARS or not key_id.isprintable():
            return None
        try:
            tpm = int(fields["tpm"]) if "tpm" in fields else None
            budget = int(fields["budget"]) if "budget" in fields else None
        except ValueError:
            return None
        if (tpm is not None and tpm < 0) or (budget is not None and budget < 0):
            return None
        return cls(key_id, fields.get("tier", "")[:_MAX_ID_CHARS], tpm, budget)


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller resolved against its tier: everything admission, budgets, metrics and the ledger
    need. ``label`` is its metrics label (its id when metered, else ``other``)."""

    key_id: str
    tier: str
    priority: Priority
    weight: int
    tokens_per_minute: int
    token_budget: int
    budget_period: str
    label: str
    # Whether its tokens are limited at all (else no store is asked while it streams): decided
    # once, when the caller is resolved (``Tenants.identify``).
    metered_tokens: bool


class Tenants:
    """Resolves callers against ``[tenancy]``: their tier, the priority they may have, their
    token limits and metric label. Safe for concurrent use (it holds no state)."""

    def __init__(self, settings: Tenancy) -> None:
        self._settings = settings
        self._metered = frozenset(settings.metered_keys)
        self.anonymous = self.identify(Caller())

    @property
    def settings(self) -> Tenancy:
        return self._settings

    def label(self, key_id: str) -> str:
        return key_id if key_id in self._metered else "other"

    def identify(self, caller: Caller) -> Identity:
        """``caller``'s identity. An unknown tier is the default tier; a priority above the
        tier's ``max_priority`` is capped to it."""
        tier: Tier = self._settings.tier(caller.tier or self._settings.default_tier)
        ceiling = Priority[tier.max_priority.upper()]
        priority = Priority[tier.priority.upper()]
        if caller.priority is not None:
            priority = min(caller.priority, ceiling)
        tokens_per_minute = (
            tier.tokens_per_minute if caller.tokens_per_minute is None else caller.tokens_per_minute
        )
        token_budget = tier.token_budget if caller.token_budget is None else caller.token_budget
        return Identity(
            key_id=caller.key_id,
            tier=tier.name,
            priority=priority,
            weight=tier.weight,
            tokens_per_minute=tokens_per_minute,
            token_budget=token_budget,
            budget_period=tier.budget_period,
            label=self.label(caller.key_id),
            metered_tokens=tokens_per_minute > 0 or token_budget > 0,
        )

    def forwarded(self, metadata: Mapping[str, str | bytes], default: Caller) -> Identity:
        """The identity of the caller forwarded in ``metadata`` (``caller_from_metadata``), or
        of ``default`` when none is (or it is malformed): one call for the usual case."""
        return self.identify(caller_from_metadata(metadata) or default)


current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "tokenrelay_caller", default=None
)
"""The caller of the request being served in this task (set by the edge's auth middleware and
the orchestrator's caller interceptor)."""


def forwarded_metadata() -> Sequence[tuple[str, str]]:
    """The metadata that forwards the current caller to the orchestrator (none without one)."""
    caller = current_caller.get()
    if caller is None:
        return ()
    metadata = [(CALLER_HEADER, caller.encode())]
    if caller.priority is not None:
        metadata.append((PRIORITY_HEADER, caller.priority.name.lower()))
    return metadata


def caller_from_metadata(metadata: Mapping[str, str | bytes]) -> Caller | None:
    """The forwarded caller in ``metadata`` (None when absent or malformed), with its asked-for
    priority."""
    raw = metadata.get(CALLER_HEADER)
    caller = Caller.decode(raw) if isinstance(raw, str) else None
    if caller is None:
        return None
    return Caller(
        caller.key_id,
        caller.tier,
        caller.tokens_per_minute,
        caller.token_budget,
        requested_priority(metadata),
    )


def requested_priority(metadata: Mapping[str, str | bytes]) -> Priority | None:
    raw = metadata.get(PRIORITY_HEADER)
    return Priority.parse(raw) if isinstance(raw, str) else None
