"""The supervisor's coordinator with workers' clients on a real Unix socket: admission and the
keys' limits are one for the group, and a worker that goes away gives back what it held."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from _support import eventually
from tokenrelay._workers import Coordinator, CoordinatorLimits, RemoteAdmission, Supervisor
from tokenrelay.config import Admission, Tenancy
from tokenrelay.errors import LimitsUnavailable, Overloaded
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.tenancy import Identity, Priority, TokenAsk, make_limits

ADMISSION = Admission(max_concurrent=1, max_queue=2, queue_timeout_s=5.0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(tmp_path / "coordinator.sock", AdmissionControl(ADMISSION))
    await coordinator.start()
    yield coordinator
    await coordinator.close()


@pytest.fixture
def coordinator(served: Coordinator, tmp_path: Path) -> Path:
    return tmp_path / "coordinator.sock"


def _identity(key: str, priority: Priority) -> Identity:
    return Identity(key, "default", priority, 1, 0, 0, "day", key, False)


async def test_one_slot_for_two_workers_and_priorities_cross_the_socket(
    served: Coordinator, coordinator: Path
) -> None:
    first, second = RemoteAdmission(coordinator, ADMISSION), RemoteAdmission(coordinator, ADMISSION)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(worker: RemoteAdmission, name: str, priority: Priority) -> None:
        async with worker.slot(10.0, _identity(name, priority)):
            order.append(name)
            await release.wait()

    running = asyncio.create_task(hold(first, "running", Priority.NORMAL))
    assert await eventually(lambda: first.running == 1)
    normal = asyncio.create_task(hold(second, "normal", Priority.NORMAL))
    assert await eventually(lambda: served.queued == 1)  # queued in the coordinator first...
    high = asyncio.create_task(hold(first, "high", Priority.HIGH))
    assert await eventually(lambda: served.queued == 2)
    assert second.queued_in(Priority.NORMAL) == 1 and first.queued_in(Priority.HIGH) == 1
    with pytest.raises(Overloaded):  # ... and the queue (2) is full for a newcomer of its class
        async with second.slot(10.0, _identity("late", Priority.NORMAL)):
            pass
    release.set()
    await asyncio.gather(running, normal, high)
    assert order == ["running", "high", "normal"]  # ... but the high one overtook it


async def test_a_worker_gone_while_waiting_or_holding_gives_its_slot_back(
    coordinator: Path,
) -> None:
    worker = RemoteAdmission(coordinator, ADMISSION)
    entered = asyncio.Event()

    async def hold() -> None:
        async with worker.slot(10.0):
            entered.set()
            await asyncio.sleep(60)

    holding = asyncio.create_task(hold())
    await entered.wait()
    waiting = asyncio.create_task(hold())
    assert await eventually(lambda: worker.queued == 1)
    for task in (waiting, holding):  # the caller gone: the connection closes
        task.cancel()
    await asyncio.gather(waiting, holding, return_exceptions=True)
    async with asyncio.timeout(2), worker.slot(1.0):
        assert worker.running == 1


async def test_the_keys_limits_are_counted_once_for_all_workers(coordinator: Path) -> None:
    first, second = CoordinatorLimits(coordinator), CoordinatorLimits(coordinator)
    waits = [await (first, second)[i % 2].take_request("k", 3) for i in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0
    lease = await first.open_stream("k", 1)
    assert lease is not None and await second.open_stream("k", 1) is None
    await lease.release()
    again = await second.open_stream("k", 1)
    assert again is not None
    await again.release()
    ask = TokenAsk("k", 60, per_minute=100)
    assert (await first.take_tokens(ask)).granted == 60
    short = await second.take_tokens(ask)
    assert short.granted == 40 and short.exhausted == "tokens_per_minute"
    await first.give_back_tokens(dataclasses.replace(ask, wanted=50))
    assert (await second.take_tokens(dataclasses.replace(ask, wanted=50))).granted == 50


async def test_a_burst_of_asks_past_asyncios_default_backlog_is_answered(
    coordinator: Path,
) -> None:
    # Each ask is a connection, all made before the coordinator accepts any: a backlog of 100
    # refused most of them (EAGAIN) and the requests failed as if the store were down.
    limits = CoordinatorLimits(coordinator)
    waits = await asyncio.gather(*(limits.take_request(f"k{i}", 5) for i in range(600)))
    assert waits == [0.0] * 600


async def test_a_supervisor_backs_off_a_crashing_worker_then_gives_up(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    crash = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    supervisor = Supervisor("test", [sys.executable, "-c", crash], 2, restart_delay_s=0.05)
    began = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(supervisor.run(), 30) == 1  # gave up
    took = asyncio.get_running_loop().time() - began
    assert starts.read_text() == "x" * 10  # each worker started 5 times
    assert took >= 0.05 + 0.1 + 0.2 + 0.4  # restarts waited 0.05, then twice as long each time


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_workers_coordinator_out_of_reach_falls_under_the_store_down_policy(
    tmp_path: Path, policy: str
) -> None:
    # Used directly, a coordinator out of reach (gone, or its accept queue full) raised
    # StoreDown, which the edge answered with a 500.
    limits = make_limits(
        Tenancy(on_store_failure=policy),  # type: ignore[arg-type]
        None,
        shared=CoordinatorLimits(tmp_path / "nobody.sock"),
    )
    if policy == "open":
        assert await limits.take_request("k", 3) == 0.0  # per-process limits meanwhile
    else:
        with pytest.raises(LimitsUnavailable):
            await limits.take_request("k", 3)
    await limits.close()
