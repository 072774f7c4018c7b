"""Per-tenant metrics with bounded label sets: the ``key`` label is a key's id only for the keys
listed in ``tenancy.metered_keys``, and ``other`` for every other key; ``tier`` takes the
configured tiers' names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["TenantMetrics"]


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "tokenrelay_tenant_requests",
            "Requests per tenant (metered keys by id, others as 'other') by how they ended",
            ["key", "tier", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "tokenrelay_tenant_tokens",
            "Tokens per tenant: prompt, or completion as delivered",
            ["key", "tier", "kind"],
            registry=r,
        )
        self.refused = Counter(
            "tokenrelay_tenant_refused",
            "Requests refused by a tenant limit (rpm, streams, tokens_per_minute, budget)",
            ["key", "tier", "limit"],
            registry=r,
        )
        self.store_down = Gauge(
            "tokenrelay_limits_store_down",
            "1 while the shared limits store cannot be reached",
            registry=r,
        )
        self.ledger_lost = Counter(
            "tokenrelay_usage_ledger_lost",
            "Usage records dropped: the ledger's batch was full (PostgreSQL down or slow)",
            registry=r,
        )
        self.ledger_written = Counter(
            "tokenrelay_usage_ledger_written",
            "Usage records written to the ledger",
            registry=r,
        )
