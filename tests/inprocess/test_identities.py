"""Who a request is for, in process: gRPC clients known by a token or an mTLS certificate of
``orchestrator.clients_file`` get that entry's identity (tier, priority, token limits) and are
held to its requests per minute and concurrent calls, the edge's forwarded key id and tier reach
the orchestrator, and both show in the orchestrator's log line, its span and its
``tokenrelay_tenant_*`` metrics (bounded labels).

Spans go to a tracer provider of the test's own (the services install theirs in ``__main__``,
and OpenTelemetry lets the global one be set once per process); log lines are formatted as the
services write them (``tokenrelay.logs``), which is where bound fields such as ``key_id`` join.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from _support import FakeSource, eventually, make_certificates
from tokenrelay import tracing
from tokenrelay.config import (
    EdgeSettings,
    OrchestratorSettings,
    Secrets,
    Settings,
    Tenancy,
    Tier,
)
from tokenrelay.edge import create_app
from tokenrelay.logs import _JsonFormatter
from tokenrelay.orchestrator import Orchestrator
from tokenrelay.security import Secret, hash_key, new_key
from tokenrelay.tenancy import CALLER_HEADER, PRIORITY_HEADER, Caller
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.wire import from_rpc_error

SECRET = "internal-" + new_key()
BATCH, NIGHTLY, RETIRED = new_key(), new_key(), new_key()  # clients file tokens
POLLER, STREAMER = new_key(), new_key()  # clients file tokens: 2 rpm; 1 concurrent call
ALICE, BOB = new_key(), new_key()  # the edge's API keys
RANKER_SAN = "spiffe://tokenrelay.test/ranker"
INDEXER_SAN = "indexer.tokenrelay.test"
RETIRED_SAN = "spiffe://tokenrelay.test/retired"
REQUEST = pb.GenerateRequest(model="synthetic", prompt="go")  # "Hello world!": 1 + 3 tokens
ANSWER = "Hello world!"
GENERATE = "tokenrelay.v1.GenerationService/Generate"
GENERATE_STREAM = "tokenrelay.v1.GenerationService/GenerateStream"  # the edge's call
TENANCY = Tenancy(
    tiers=(
        Tier("standard"),
        Tier("bulk", priority="low", max_priority="low"),
        Tier("gold", priority="high", max_priority="high", weight=4),
    ),
    metered_keys=("batch-job", "ranker", "indexer", "alice"),
)


def _clients_file(path: Path) -> Path:
    """The gRPC clients: two by token (one with a budget of its own of 4 tokens, the prompt
    and answer of one ``REQUEST``), two by certificate (one with the same budget), and a
    revoked one known both ways."""
    entries: list[dict[str, Any]] = [
        {"id": "batch-job", "sha256": hash_key(BATCH), "tier": "bulk", "token_budget": 4},
        {"id": "nightly", "sha256": hash_key(NIGHTLY)},
        {"id": "ranker", "sha256": hash_key(new_key()), "tier": "gold", "san": RANKER_SAN},
        {"id": "indexer", "sha256": hash_key(new_key()), "san": INDEXER_SAN, "token_budget": 4},
        {"id": "retired", "sha256": hash_key(RETIRED), "san": RETIRED_SAN, "revoked": True},
        {"id": "poller", "sha256": hash_key(POLLER), "requests_per_minute": 2},
        {"id": "streamer", "sha256": hash_key(STREAMER), "max_streams": 1},
    ]
    path.write_text(tomli_w.dumps({"keys": entries}))
    return path


def _keys_file(path: Path) -> Path:
    """The edge's keys: alice (gold, metered) and bob (no tier: standard; not metered)."""
    entries = [
        {"id": "alice", "sha256": hash_key(ALICE), "tier": "gold"},
        {"id": "bob", "sha256": hash_key(BOB)},
    ]
    path.write_text(tomli_w.dumps({"keys": entries}))
    return path


@pytest.fixture
async def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span the services make during the test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_TRACER", provider.get_tracer("tokenrelay"))
    yield exporter
    provider.shutdown()


class _Lines(logging.Handler):
    """Log lines as the services write them: JSON objects with the bound fields."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(_JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def ended(self) -> list[tuple[str, str]]:
        """(key_id, tier) of each orchestrator "generation ended" line."""
        return [
            (line.get("key_id"), line.get("tier"))
            for line in self.lines
            if line["msg"] == "generation ended" and line["logger"].startswith("tokenrelay.orch")
        ]


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("tokenrelay")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
async def orchestrator(source: FakeSource, tmp_path: Path) -> AsyncIterator[Orchestrator]:
    """The internal secret guards it; the clients file names clients of their own."""
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=(source.name,),
            metrics_listen="127.0.0.1:0",
            clients_file=str(_clients_file(tmp_path / "clients.toml")),
        ),
        tenancy=TENANCY,
        secrets=Secrets(internal=Secret(SECRET)),
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    yield orchestrator
    await orchestrator.stop(grace_s=0)


@dataclass(frozen=True, slots=True)
class _Mutual:
    orchestrator: Orchestrator
    certs: dict[str, Path]

    def channel(self, client: str) -> grpc.aio.Channel:
        certs = self.certs
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs["ca"].read_bytes(),
            private_key=certs[f"{client}_key"].read_bytes(),
            certificate_chain=certs[client].read_bytes(),
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{self.orchestrator.port}", credentials)


@pytest.fixture
async def mutual(source: FakeSource, tmp_path: Path) -> AsyncIterator[_Mutual]:
    """Mutual TLS alone guards it (no secret): a certificate of the CA that the clients file
    does not name is an internal component's, as the edge's."""
    certs = make_certificates(
        tmp_path,
        {"ranker": [RANKER_SAN], "indexer": [INDEXER_SAN], "retired": [RETIRED_SAN]},
    )
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=(source.name,),
            metrics_listen="127.0.0.1:0",
            clients_file=str(_clients_file(tmp_path / "clients.toml")),
            tls_cert=str(certs["server"]),
            tls_key=str(certs["server_key"]),
            tls_client_ca=str(certs["ca"]),
        ),
        tenancy=TENANCY,
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    yield _Mutual(orchestrator, certs)
    await orchestrator.stop(grace_s=0)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# What a client might claim to be: believed only from the internal secret's holder (the edge).
_CLAIM = ((CALLER_HEADER, Caller("alice", "gold").encode()), (PRIORITY_HEADER, "high"))


def _identities(spans: InMemorySpanExporter, name: str = GENERATE) -> list[tuple[Any, ...]]:
    """(key_id, tier, priority) of each orchestrator call span ``name``, in order."""
    return [
        (
            span.attributes.get("tokenrelay.key_id"),
            span.attributes.get("tokenrelay.tier"),
            span.attributes.get("tokenrelay.priority"),
        )
        for span in spans.get_finished_spans()
        if span.name == name and span.attributes is not None
    ]


async def _tenant_samples(orchestrator: Orchestrator) -> dict[tuple[str, frozenset[Any]], float]:
    """The ``tokenrelay_tenant_*_total`` samples of the orchestrator's /metrics."""
    url = f"http://127.0.0.1:{orchestrator.metrics_port}/metrics"
    async with ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("tokenrelay_tenant_") and sample.name.endswith("_total")
    }


def _count(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    """``tokenrelay_tenant_<name>_total{labels}`` (0 when there is no such series)."""
    return samples.get((f"tokenrelay_tenant_{name}_total", frozenset(labels.items())), 0.0)


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


async def test_a_client_token_of_the_clients_file_gets_its_entrys_identity_and_limits(
    orchestrator: Orchestrator, spans: InMemorySpanExporter, lines: _Lines
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for token in ("tr-unknown", RETIRED):  # not in the file; revoked
            refusal = await _refused(stub.Generate(REQUEST, metadata=_bearer(token)))
            assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED, token
        # batch-job claims to be alice of the gold tier, at high priority: it is batch-job,
        # of the bulk tier, at that tier's most (low).
        answer = await stub.Generate(REQUEST, metadata=(*_bearer(BATCH), *_CLAIM))
        assert answer.text == ANSWER
        # Its own budget of 4 tokens is spent: refused before it is queued.
        refusal = await _refused(stub.Generate(REQUEST, metadata=_bearer(BATCH)))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "token budget" in (refusal.details() or "")
        # Another client of the file has no such limit, and is not charged for batch-job's.
        for _ in range(2):
            answer = await stub.Generate(REQUEST, metadata=_bearer(NIGHTLY))
            assert answer.text == ANSWER
    assert _identities(spans) == [
        (None, None, None),  # the two refused at the door: no identity
        (None, None, None),
        ("batch-job", "bulk", "low"),
        ("batch-job", "bulk", "low"),
        ("nightly", "standard", "normal"),
        ("nightly", "standard", "normal"),
    ]
    assert lines.ended() == [
        ("batch-job", "bulk"),  # the one refused for its budget generated nothing
        ("nightly", "standard"),
        ("nightly", "standard"),
    ]
    samples = await _tenant_samples(orchestrator)
    assert _count(samples, "requests", key="batch-job", tier="bulk", outcome="stop") == 1
    assert _count(samples, "requests", key="batch-job", tier="bulk", outcome="over_budget") == 1
    assert _count(samples, "refused", key="batch-job", tier="bulk", limit="budget") == 1
    assert _count(samples, "tokens", key="batch-job", tier="bulk", kind="prompt") == 1
    assert _count(samples, "tokens", key="batch-job", tier="bulk", kind="completion") == 3
    # nightly is not in tenancy.metered_keys: counted as "other".
    assert _count(samples, "requests", key="other", tier="standard", outcome="stop") == 2
    assert {dict(labels)["key"] for _, labels in samples} == {"batch-job", "other"}


async def test_a_client_is_held_to_its_entrys_requests_per_minute_and_no_one_else(
    orchestrator: Orchestrator,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(2):
            assert (await stub.Generate(REQUEST, metadata=_bearer(POLLER))).text == ANSWER
        refusal = await _refused(stub.Generate(REQUEST, metadata=_bearer(POLLER)))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refusal.details() == (
            "Rate limit reached: 2 requests per minute for the client 'poller'."
        )
        retry_after = from_rpc_error(refusal).retry_after
        assert retry_after is not None and 25 < retry_after <= 30  # one request's refill
        # The edge's calls for its own key "poller" were counted at the edge: not here.
        edge = (*_bearer(SECRET), (CALLER_HEADER, Caller("poller").encode()))
        for _ in range(3):
            assert (await stub.Generate(REQUEST, metadata=edge)).text == ANSWER
    samples = await _tenant_samples(orchestrator)
    assert (
        _count(samples, "refused", key="other", tier="standard", limit="requests_per_minute") == 1
    )


async def test_a_client_is_held_to_its_entrys_concurrent_calls(
    orchestrator: Orchestrator, source: FakeSource
) -> None:
    source.interval_s = 0.5  # a stream that lasts
    streaming = pb.GenerateStreamRequest(model="synthetic", prompt="go")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = stub.GenerateStream(streaming, metadata=_bearer(STREAMER))
        await first.read()
        refusal = await _refused(stub.Generate(REQUEST, metadata=_bearer(STREAMER)))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            refusal.details() == "Too many concurrent calls: at most 1 for the client 'streamer'."
        )
        first.cancel()  # its call is given back as it ends
        source.interval_s = 0.0

        async def served() -> bool:
            try:
                await stub.Generate(REQUEST, metadata=_bearer(STREAMER))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return False
            return True

        assert await eventually(served), "the cancelled call's stream stayed held"
    samples = await _tenant_samples(orchestrator)
    assert _count(samples, "refused", key="other", tier="standard", limit="max_streams") >= 1


async def test_an_mtls_certificate_named_in_the_clients_file_gets_that_identity(
    mutual: _Mutual, spans: InMemorySpanExporter, lines: _Lines
) -> None:
    # The ranker's certificate (a URI SAN) makes it the ranker, gold tier, high priority,
    # whatever identity it claims.
    async with mutual.channel("ranker") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        assert (await stub.Generate(REQUEST, metadata=_CLAIM)).text == ANSWER
    # The indexer's (a DNS SAN) makes it the indexer, with its own budget of 4 tokens.
    async with mutual.channel("indexer") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        assert (await stub.Generate(REQUEST)).text == ANSWER
        refusal = await _refused(stub.Generate(REQUEST))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "token budget" in (refusal.details() or "")
    # A revoked entry's certificate is refused, though the CA signed it.
    async with mutual.channel("retired") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        refusal = await _refused(stub.Generate(REQUEST))
        assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
    # A certificate no entry names is an internal component's: what it forwards is believed.
    async with mutual.channel("edge") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        assert (await stub.Generate(REQUEST, metadata=_CLAIM)).text == ANSWER
    assert _identities(spans) == [
        ("ranker", "gold", "high"),
        ("indexer", "standard", "normal"),
        ("indexer", "standard", "normal"),
        (None, None, None),
        ("alice", "gold", "high"),
    ]
    assert lines.ended() == [("ranker", "gold"), ("indexer", "standard"), ("alice", "gold")]
    samples = await _tenant_samples(mutual.orchestrator)
    assert _count(samples, "requests", key="ranker", tier="gold", outcome="stop") == 1
    assert _count(samples, "requests", key="indexer", tier="standard", outcome="stop") == 1
    assert _count(samples, "refused", key="indexer", tier="standard", limit="budget") == 1


async def test_the_edges_key_id_and_tier_reach_the_orchestrators_logs_spans_and_metrics(
    orchestrator: Orchestrator, spans: InMemorySpanExporter, lines: _Lines, tmp_path: Path
) -> None:
    settings = EdgeSettings(
        orchestrator=f"127.0.0.1:{orchestrator.port}",
        api_keys_file=str(_keys_file(tmp_path / "keys.toml")),
    )
    server = TestServer(
        create_app(settings, Secrets(internal=Secret(SECRET)), TENANCY), host="127.0.0.1"
    )
    await server.start_server()
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with ClientSession() as session:
            url = server.make_url("/v1/chat/completions")
            for key, priority in ((ALICE, "high"), (BOB, "high"), (BOB, "low")):
                headers = {"Authorization": f"Bearer {key}", "X-TokenRelay-Priority": priority}
                async with session.post(url, json=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    answer = await response.json()
                assert answer["choices"][0]["message"]["content"] == ANSWER
    finally:
        await server.close()
    # The orchestrator's own span of each call (not the edge's): alice's gold tier may ask for
    # high; bob's standard tier is capped at normal, and may ask for low.
    assert _identities(spans, GENERATE_STREAM) == [
        ("alice", "gold", "high"),
        ("bob", "standard", "normal"),
        ("bob", "standard", "low"),
    ]
    assert lines.ended() == [("alice", "gold"), ("bob", "standard"), ("bob", "standard")]
    text = json.dumps(lines.lines)
    assert ALICE not in text and BOB not in text  # the key itself never travels
    samples = await _tenant_samples(orchestrator)
    assert _count(samples, "requests", key="alice", tier="gold", outcome="stop") == 1
    assert _count(samples, "tokens", key="alice", tier="gold", kind="completion") == 3
    # bob is not metered: his requests count as "other", and no series names him.
    assert _count(samples, "requests", key="other", tier="standard", outcome="stop") == 2
    assert {dict(labels)["key"] for _, labels in samples} == {"alice", "other"}
