"""The limit stores behind ``LimitStore``: the same semantics from this process's counters and
from a real Redis (``redis-server`` on a free loopback port), the store-down policy with Redis
killed, token meters, and the usage ledger on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from tokenrelay.config import Tenancy, Tier
from tokenrelay.errors import LimitsUnavailable, Overloaded, QuotaExceeded
from tokenrelay.stack import free_port
from tokenrelay.stack._postgres import Postgres
from tokenrelay.stack._redis import Redis
from tokenrelay.tenancy import (
    Caller,
    FailoverLimits,
    LimitStore,
    LocalLimits,
    RedisLimits,
    Tenants,
    TokenAsk,
    TokenMeter,
    UsageLedger,
    read_usage,
)

# These tests are about what the limits count, not about a slow store: on a loaded machine a burst
# of 60 calls can wait longer than the production timeout (0.5 s) for the pool's connections.
_PATIENT = 5.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Redis]:
    with Redis(free_port()) as server:
        yield server


@pytest.fixture(params=["local", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: Redis) -> AsyncIterator[LimitStore]:
    limits: LimitStore = LocalLimits()
    if request.param == "redis":
        limits = RedisLimits(redis_server.url, timeout_s=_PATIENT)
    yield limits
    await limits.close()


def _key(request: pytest.FixtureRequest) -> str:
    return request.node.name  # a key of its own per test and store: Redis is shared


async def test_requests_per_minute_is_a_bucket_of_that_many(
    store: LimitStore, request: pytest.FixtureRequest
) -> None:
    key = _key(request)
    waits = [await store.take_request(key, 30) for _ in range(31)]
    assert waits[:30] == [0.0] * 30
    assert 0 < waits[30] <= 2.0  # one request per 2 s refills
    assert await store.take_request(key + "-other", 30) == 0.0  # per key
    assert await store.take_request(key, 0) == 0.0  # 0: no limit


async def test_concurrent_streams_are_leases(
    store: LimitStore, request: pytest.FixtureRequest
) -> None:
    key = _key(request)
    first, second = await store.open_stream(key, 2), await store.open_stream(key, 2)
    assert first is not None and second is not None
    assert await store.open_stream(key, 2) is None
    await first.release()
    await first.release()  # a second release gives nothing back twice
    third = await store.open_stream(key, 2)
    assert third is not None
    assert await store.open_stream(key, 2) is None
    await second.release()
    await third.release()


async def test_tokens_are_granted_up_to_the_bucket_and_given_back(
    store: LimitStore, request: pytest.FixtureRequest
) -> None:
    key = _key(request)
    grant = await store.take_tokens(TokenAsk(key, 70, per_minute=100))
    assert grant.granted == 70 and not grant.exhausted
    grant = await store.take_tokens(TokenAsk(key, 70, per_minute=100))
    assert grant.granted == 30 and grant.exhausted == "tokens_per_minute"
    assert 0 < grant.retry_after_s <= 0.61
    await store.give_back_tokens(TokenAsk(key, 20, per_minute=100))
    assert (await store.take_tokens(TokenAsk(key, 50, per_minute=100))).granted == 20


async def test_a_budget_holds_for_its_period(
    store: LimitStore, request: pytest.FixtureRequest
) -> None:
    key = _key(request)
    ask = TokenAsk(key, 600, budget=1000, period="day")
    assert (await store.take_tokens(ask)).granted == 600
    grant = await store.take_tokens(ask)
    assert grant.granted == 400 and grant.exhausted == "budget"
    assert 0 < grant.retry_after_s <= 86_400  # the next UTC day
    empty = await store.take_tokens(ask)
    assert empty.granted == 0 and empty.exhausted == "budget"
    await store.give_back_tokens(TokenAsk(key, 100, budget=1000, period="day"))
    assert (await store.take_tokens(ask)).granted == 100


async def test_two_clients_of_one_redis_share_every_limit(
    redis_server: Redis, request: pytest.FixtureRequest
) -> None:
    key = _key(request)
    replicas = [RedisLimits(redis_server.url, timeout_s=_PATIENT) for _ in range(2)]
    try:
        waits = await asyncio.gather(*(replicas[i % 2].take_request(key, 30) for i in range(60)))
        assert sum(1 for w in waits if w == 0) == 30
        grants = await asyncio.gather(
            *(replicas[i % 2].take_tokens(TokenAsk(key, 10, per_minute=100)) for i in range(20))
        )
        assert sum(g.granted for g in grants) == 100
        leases = await asyncio.gather(*(replicas[i % 2].open_stream(key, 3) for i in range(6)))
        assert sum(lease is not None for lease in leases) == 3
    finally:
        for replica in replicas:
            await replica.close()


def _tenants(**tier: object) -> Tenants:
    return Tenants(Tenancy(tiers=(Tier("standard", **tier),)))  # type: ignore[arg-type]


async def test_a_meter_spends_what_is_delivered_and_refuses_past_the_limit() -> None:
    store = LocalLimits()
    identity = _tenants(tokens_per_minute=40).identify(Caller("k"))
    meter = TokenMeter(store, identity, chunk=8)
    await meter.open()
    for _ in range(39):
        await meter.charge(1)
    with pytest.raises(Overloaded, match="40 tokens per minute") as refused:
        await meter.charge(2)  # 1 left: the piece is withheld, none spent
    assert refused.value.code == "rate_limit_exceeded" and refused.value.retry_after
    await meter.charge(1)
    assert meter.spent == 40
    await meter.close()
    with pytest.raises(Overloaded):  # nothing left for a new request either
        await TokenMeter(store, identity).open()


async def test_a_spent_budget_is_insufficient_quota_until_the_next_period() -> None:
    store = LocalLimits()
    identity = _tenants(token_budget=10, budget_period="month").identify(Caller("k"))
    meter = TokenMeter(store, identity)
    await meter.open()
    await meter.charge(10)
    with pytest.raises(QuotaExceeded) as refused:
        await meter.charge(1)
    assert refused.value.code == "insufficient_quota" and refused.value.http_status == 429
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    await meter.close()
    # The key's own budget (from its keys file entry) wins over its tier's.
    own = _tenants(token_budget=10).identify(Caller("k2", token_budget=1000))
    assert own.token_budget == 1000


async def test_redis_killed_fail_open_counts_per_process_then_goes_back() -> None:
    with Redis(free_port()) as server:
        limits = FailoverLimits(RedisLimits(server.url, timeout_s=0.2), "open", retry_s=0.2)
        try:
            assert await limits.take_request("k", 2) == 0.0
            server.kill()
            began = asyncio.get_running_loop().time()
            waits = [await limits.take_request("k", 2) for _ in range(3)]
            assert asyncio.get_running_loop().time() - began < 1.0  # one timeout, not three
            assert limits.down and waits[:2] == [0.0, 0.0] and waits[2] > 0  # local bucket
            server.start()
            await asyncio.sleep(0.25)  # past retry_s (a timer): the store is tried again
            assert await limits.take_request("k", 2) == 0.0  # Redis again: its first request
            assert not limits.down
        finally:
            await limits.close()


async def test_redis_killed_fail_closed_refuses_with_503_then_serves_again() -> None:
    with Redis(free_port()) as server:
        limits = FailoverLimits(RedisLimits(server.url, timeout_s=0.2), "closed", retry_s=0.2)
        try:
            assert await limits.take_request("k", 5) == 0.0
            server.kill()
            with pytest.raises(LimitsUnavailable) as refused:
                await limits.take_request("k", 5)
            assert refused.value.http_status == 503
            with pytest.raises(LimitsUnavailable):
                await limits.open_stream("k", 1)
            server.start()
            await asyncio.sleep(0.25)  # past retry_s (a timer): the store is tried again
            assert await limits.take_request("k", 5) == 0.0
        finally:
            await limits.close()


async def test_ledger_adds_usage_per_key_model_and_day_across_writers() -> None:
    with Postgres(free_port()) as postgres:
        writers = [UsageLedger(postgres.dsn), UsageLedger(postgres.dsn)]
        try:
            writers[0].record("alice", "synthetic", "stop", 10, 5)
            writers[0].record("alice", "synthetic", "cancelled", 4, 2)
            writers[1].record("alice", "synthetic", "over_budget", 3, 1)
            writers[1].record("alice", "synthetic", "failed", 0, 0)
            writers[1].record("bob", "synthetic", "length", 1, 64)
            assert [await w.flush() for w in writers] == [1, 2]
            today = datetime.datetime.now(datetime.UTC).date()
            rows = await read_usage(postgres.dsn, today, today)
        finally:
            for writer in writers:
                await writer.close()
    alice, bob = rows
    assert (alice.key_id, alice.requests, alice.prompt_tokens, alice.completion_tokens) == (
        "alice",
        4,
        17,
        8,
    )
    assert (alice.cancelled, alice.failed, alice.refused) == (1, 1, 1)
    assert (bob.requests, bob.completion_tokens, bob.failed) == (1, 64, 0)


async def test_ledger_keeps_its_batch_while_postgres_is_down_and_counts_what_it_drops() -> None:
    lost: list[int] = []
    port = free_port()
    ledger = UsageLedger(
        f"postgresql://postgres@127.0.0.1:{port}/postgres",
        max_rows=2,
        on_lost=lambda: lost.append(1),
    )
    ledger.record("a", "m", "stop", 1, 1)
    ledger.record("b", "m", "stop", 1, 1)
    ledger.record("a", "m", "stop", 1, 1)  # the same row: summed, nothing dropped
    ledger.record("c", "m", "stop", 1, 1)  # a third row: past max_rows, dropped
    assert ledger.pending == 2 and ledger.lost == 1 and lost == [1]
    with pytest.raises(OSError):
        await ledger.flush()
    assert ledger.pending == 2  # kept for the next round
    with Postgres(port) as postgres:
        assert await ledger.flush() == 2
        today = datetime.datetime.now(datetime.UTC).date()
        rows = {r.key_id: r.requests for r in await read_usage(postgres.dsn, today, today)}
        await ledger.close()
    assert rows == {"a": 2, "b": 1}


def test_usage_command_prints_the_ledger(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenrelay.cli import main

    with Postgres(free_port()) as postgres:

        async def write() -> None:
            ledger = UsageLedger(postgres.dsn)
            ledger.record("alice", "synthetic", "stop", 12, 30)
            ledger.record("alice", "synthetic", "cancelled", 3, 4)
            await ledger.close()  # writes what is left

        asyncio.run(write())
        monkeypatch.setenv("TOKENRELAY_POSTGRES_DSN", postgres.dsn)
        with pytest.raises(SystemExit) as done:
            main(["usage", "--key", "alice"])
        assert done.value.code == 0
        table = capsys.readouterr().out.splitlines()
        with pytest.raises(SystemExit):
            main(["usage", "--json"])
        lines = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "day",
        "key_id",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cancelled",
        "failed",
        "refused",
    ]
    assert table[1].split()[1:] == ["alice", "synthetic", "2", "15", "34", "1", "0", "0"]
    assert json.loads(lines[0])["completion_tokens"] == 34
