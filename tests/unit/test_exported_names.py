"""Each package's public face is what it says it is: the names in ``__all__`` exist, and nothing
else is promised (as httpx pins its exported members)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import tokenrelay

PUBLIC = {
    "tokenrelay.config": {
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
    },
    "tokenrelay.errors": {
        "AlreadyExists",
        "CollectionNotFound",
        "GenerationFailed",
        "Gone",
        "InvalidRequest",
        "LimitsUnavailable",
        "ModelNotFound",
        "NotFound",
        "Overloaded",
        "QuotaExceeded",
        "RelayError",
        "Unauthenticated",
        "UpstreamTimeout",
        "UpstreamUnavailable",
    },
    "tokenrelay.orchestrator": {"Orchestrator", "serve"},
    "tokenrelay.edge": {"create_app", "run"},
    "tokenrelay.stack": {
        "Stack",
        "StackError",
        "StackPorts",
        "TritonPorts",
        "TritonProcess",
        "free_port",
    },
    "tokenrelay.retrieval": {
        "CollectionInfo",
        "Document",
        "Embedded",
        "Embedder",
        "EmbeddingSource",
        "Hit",
        "RetrievalMetrics",
        "Retriever",
        "StoreUnavailable",
        "StoredChunk",
        "VectorStore",
        "check_collection_name",
        "chunk_id",
        "estimate_tokens",
        "make_store",
        "split_text",
    },
    "tokenrelay.tenancy": {
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
    },
    "tokenrelay.wire": {
        "DETAILS_KEY",
        "DOMAIN",
        "from_rpc_error",
        "status_of",
        "to_status",
        "trailers",
        "usage_to_pb",
    },
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_a_package_exports_exactly_its_public_names(module: str) -> None:
    imported = importlib.import_module(module)
    assert set(imported.__all__) == PUBLIC[module]
    for name in imported.__all__:
        assert getattr(imported, name) is not None


# Packages with no public face of their own: the generated protobuf code, and the models Triton's
# Python stub loads by file (each model module is its entry point).
NO_FACE = {"tokenrelay.v1", "tokenrelay.triton_python"}


def test_every_package_is_pinned() -> None:
    packages = {
        f"tokenrelay.{info.name}"
        for info in pkgutil.iter_modules(tokenrelay.__path__)
        if info.ispkg and not info.name.startswith("_")
    }
    assert packages - NO_FACE == {m for m in PUBLIC if m in packages}
    for name in NO_FACE:
        assert not hasattr(importlib.import_module(name), "__all__"), name
