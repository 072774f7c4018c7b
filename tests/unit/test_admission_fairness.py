"""Admission control: priority classes, weighted fair shares among keys, earliest deadline first
within a key, shedding the lowest class first (``orchestrator/_admission.py``)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from _support import eventually
from tokenrelay.config import Admission, Tenancy, Tier
from tokenrelay.errors import Overloaded
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.tenancy import Caller, Identity, Priority, Tenants

TENANTS = Tenants(
    Tenancy(
        tiers=(
            Tier("standard", max_priority="high"),
            Tier("gold", weight=3, max_priority="high"),
        )
    )
)


def _who(key: str, tier: str = "standard", priority: Priority | None = None) -> Identity:
    return TENANTS.identify(Caller(key, tier, priority=priority))


async def _flood(
    admission: AdmissionControl,
    identity: Identity,
    clients: int,
    served: Counter[str],
    measuring: asyncio.Event,
    stop: asyncio.Event,
    work_s: float = 0.001,
) -> None:
    """``clients`` callers of ``identity`` that ask again as soon as they are served; once
    ``measuring``, each slot is counted in ``served``, and ``stop`` is set at 400."""

    async def client() -> None:
        while not stop.is_set():
            try:
                async with admission.slot(5.0, identity):
                    if stop.is_set():
                        return
                    if measuring.is_set():
                        served[identity.key_id] += 1
                        if served.total() >= 400:
                            stop.set()
                    await asyncio.sleep(work_s)
            except Overloaded:
                await asyncio.sleep(0)

    await asyncio.gather(*(client() for _ in range(clients)))


@pytest.mark.parametrize(
    ("flooder_clients", "quiet_clients", "quiet_tier", "quiet_share"),
    [(40, 4, "standard", 0.5), (40, 4, "gold", 0.75), (8, 40, "standard", 0.5)],
)
async def test_busy_keys_share_the_slots_by_weight_however_many_requests_they_queue(
    flooder_clients: int, quiet_clients: int, quiet_tier: str, quiet_share: float
) -> None:
    admission = AdmissionControl(Admission(max_concurrent=2, max_queue=256, queue_timeout_s=5))
    served: Counter[str] = Counter()
    measuring, stop = asyncio.Event(), asyncio.Event()
    flood = asyncio.gather(
        _flood(admission, _who("flooder"), flooder_clients, served, measuring, stop),
        _flood(admission, _who("quiet", quiet_tier), quiet_clients, served, measuring, stop),
    )
    await asyncio.sleep(0.2)  # past the start, when every client queues at once
    measuring.set()  # the steady state only
    await stop.wait()
    share = served["quiet"] / served.total()
    await flood
    print(f"quiet ({quiet_tier}, {quiet_clients} clients vs {flooder_clients}): {share:.2f}")
    assert share == pytest.approx(quiet_share, abs=0.10), served


async def test_a_high_priority_request_overtakes_a_queue_of_low_ones() -> None:
    admission = AdmissionControl(Admission(max_concurrent=1, max_queue=64, queue_timeout_s=5))
    order: list[str] = []
    hold = asyncio.Event()

    async def one(name: str, identity: Identity) -> None:
        async with admission.slot(5.0, identity):
            order.append(name)
            await hold.wait()

    first = asyncio.create_task(one("running", _who("bulk", priority=Priority.LOW)))
    await asyncio.sleep(0)
    low = [
        asyncio.create_task(one(f"low-{i}", _who("bulk", priority=Priority.LOW))) for i in range(10)
    ]
    assert await eventually(lambda: admission.queued == 10)
    high = asyncio.create_task(one("high", _who("interactive", priority=Priority.HIGH)))
    assert await eventually(lambda: admission.queued == 11)
    hold.set()
    await asyncio.gather(first, high, *low)
    assert order[:2] == ["running", "high"]


async def test_the_earliest_deadline_of_a_key_goes_first() -> None:
    admission = AdmissionControl(Admission(max_concurrent=1, max_queue=64, queue_timeout_s=30))
    order: list[float] = []
    hold = asyncio.Event()
    who = _who("k")

    async def one(budget_s: float) -> None:
        async with admission.slot(budget_s, who):
            order.append(budget_s)
            await hold.wait()

    running = asyncio.create_task(one(29))
    await asyncio.sleep(0)
    waiting = []
    for budget in (20, 5, 10, 15):
        waiting.append(asyncio.create_task(one(budget)))
        await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(running, *waiting)
    assert order == [29, 5, 10, 15, 20]


async def test_a_full_queue_sheds_the_lowest_class_first_with_retry_after() -> None:
    admission = AdmissionControl(
        Admission(max_concurrent=1, max_queue=3, queue_timeout_s=5, retry_after_s=2.0)
    )
    hold = asyncio.Event()

    async def one(identity: Identity) -> str:
        try:
            async with admission.slot(5.0, identity):
                await hold.wait()
        except Overloaded as exc:
            assert exc.retry_after == 2.0
            return "refused"
        return "served"

    running = asyncio.create_task(one(_who("a")))
    await asyncio.sleep(0)
    lows = [asyncio.create_task(one(_who("bulk", priority=Priority.LOW))) for _ in range(3)]
    assert await eventually(lambda: admission.queued == 3)
    high = asyncio.create_task(one(_who("b", priority=Priority.HIGH)))  # sheds one low
    assert await eventually(lambda: admission.shed == 1)
    assert admission.queued == 3
    # A low newcomer cannot shed anything (nothing lower, and its key is the busiest).
    assert await one(_who("bulk", priority=Priority.LOW)) == "refused"
    hold.set()
    results = await asyncio.gather(running, high, *lows)
    assert results[:2] == ["served", "served"]
    assert sorted(results[2:]) == ["refused", "served", "served"]


async def test_within_a_class_the_busiest_key_gives_up_a_waiter_to_a_newcomer() -> None:
    admission = AdmissionControl(Admission(max_concurrent=1, max_queue=4, queue_timeout_s=5))
    hold = asyncio.Event()
    outcomes: Counter[str] = Counter()

    async def one(key: str) -> None:
        try:
            async with admission.slot(5.0, _who(key)):
                await hold.wait()
            outcomes[f"{key} served"] += 1
        except Overloaded:
            outcomes[f"{key} refused"] += 1

    tasks = [asyncio.create_task(one("flooder")) for _ in range(5)]  # 1 running, 4 queued
    assert await eventually(lambda: admission.queued == 4)
    tasks.append(asyncio.create_task(one("quiet")))
    assert await eventually(lambda: admission.shed == 1)  # a flooder's waiter, for the quiet one
    hold.set()
    await asyncio.gather(*tasks)
    assert outcomes == Counter({"flooder served": 4, "flooder refused": 1, "quiet served": 1})


async def test_a_waiter_that_gives_up_leaves_no_trace() -> None:
    admission = AdmissionControl(Admission(max_concurrent=1, max_queue=8, queue_timeout_s=0.05))
    hold = asyncio.Event()

    async def running() -> None:
        async with admission.slot(None, _who("a")):
            await hold.wait()

    task = asyncio.create_task(running())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="no slot freed up in time"):
        async with admission.slot(None, _who("b")):
            pass
    waiter = asyncio.create_task(admission.slot(None, _who("c")).__aenter__())
    assert await eventually(lambda: admission.queued == 1)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert admission.queued == 0 and admission.running == 1
    hold.set()
    await task
    assert admission.running == 0
    async with admission.slot(None, _who("d")):
        assert admission.running == 1
