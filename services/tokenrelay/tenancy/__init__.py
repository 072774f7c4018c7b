"""Many tenants on shared capacity: who a request is for, what its key may use, and what it used.

- ``Identity``/``Tenants``: a caller (key id, tier, token limits, asked-for priority) resolved
  against ``[tenancy]``'s tiers; ``Caller`` crosses the internal hop as metadata;
- ``LimitStore``: requests per minute, concurrent streams, tokens per minute and budgets per
  period; ``LocalLimits`` in one process, ``RedisLimits`` shared by every replica,
  ``FailoverLimits`` with the store-down policy; ``make_limits`` builds what the settings say;
- ``TokenMeter``: one request's tokens charged as they are generated;
- ``UsageLedger``: usage per key, model and day in PostgreSQL, written in batches off the hot path;
- ``TenantMetrics``: per-tenant series with bounded labels.
"""

from __future__ import annotations

from tokenrelay.config import Tenancy
from tokenrelay.security import Secret
from tokenrelay.tenancy._failover import FailoverLimits
from tokenrelay.tenancy._identity import (
    ANONYMOUS,
    CALLER_HEADER,
    PRIORITY_HEADER,
    Caller,
    Identity,
    Priority,
    Tenants,
    caller_from_metadata,
    current_caller,
    forwarded_metadata,
    requested_priority,
)
from tokenrelay.tenancy._ledger import UsageLedger, UsageRecord, read_usage
from tokenrelay.tenancy._limits import (
    LimitStore,
    LocalLimits,
    StreamLease,
    TokenAsk,
    TokenGrant,
    period_of,
)
from tokenrelay.tenancy._meter import TokenMeter
from tokenrelay.tenancy._metrics import TenantMetrics
from tokenrelay.tenancy._redis import RedisLimits, StoreDown

__all__ = [
    "ANONYMOUS",
    "CALLER_HEADER",
    "PRIORITY_HEADER",
    "Caller",
    "FailoverLimits",
    "Identity",
    "LimitStore",
    "LocalLimits",
    "Priority",
    "RedisLimits",
    "StoreDown",
    "StreamLease",
    "TenantMetrics",
    "Tenants",
    "TokenAsk",
    "TokenGrant",
    "TokenMeter",
    "UsageLedger",
    "UsageRecord",
    "caller_from_metadata",
    "current_caller",
    "forwarded_metadata",
    "make_limits",
    "period_of",
    "read_usage",
    "requested_priority",
]


def make_limits(
    tenancy: Tenancy,
    redis_url: Secret | None,
    metrics: TenantMetrics | None = None,
    shared: LimitStore | None = None,
) -> LimitStore:
    """The store ``tenancy.store`` names: this process's counters, or Redis (``redis_url``)
    behind the store-down policy; ``shared``: another store that several processes share (a
    worker's coordinator), behind the same policy. Create it inside the event loop that uses
    it."""
    if shared is None:
        if tenancy.store == "local":
            return LocalLimits()
        assert redis_url is not None, "load_settings checks this"
        shared = RedisLimits(redis_url.value, timeout_s=tenancy.store_timeout_s)

    def changed(down: bool) -> None:
        if metrics is not None:
            metrics.store_down.set(1 if down else 0)

    return FailoverLimits(
        shared, tenancy.on_store_failure, tenancy.store_retry_s, on_change=changed
    )
