"""Circuit-breaker transitions and the router's choice, on a fake clock (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import MutableSequence

import pytest

from _support import Clock, FakeSource, Ordered
from tokenrelay.config import Breaker
from tokenrelay.orchestrator._pool import (
    BreakerState,
    CircuitBreaker,
    Lease,
    NodePool,
    Outcome,
    Permit,
    Placement,
)

SETTINGS = Breaker(
    failure_threshold=3,
    failure_rate=0.5,
    window_s=10.0,
    min_requests=6,
    cooldown_s=5.0,
    half_open_probes=2,
)


def _breaker(clock: Clock) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "n:1", SETTINGS, clock, on_change=lambda _, a, b: changes.append((a.value, b.value))
    )
    return breaker, changes


def _run(breaker: CircuitBreaker, outcome: Outcome) -> None:
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, outcome)


def test_consecutive_failures_open_then_cooldown_half_open_then_trial_success_closes() -> None:
    clock = Clock()
    breaker, changes = _breaker(clock)
    _run(breaker, Outcome.FAILURE)
    _run(breaker, Outcome.FAILURE)
    _run(breaker, Outcome.SUCCESS)  # a success resets the run of failures
    _run(breaker, Outcome.FAILURE)
    _run(breaker, Outcome.FAILURE)
    assert breaker.state is BreakerState.CLOSED
    _run(breaker, Outcome.FAILURE)
    assert breaker.state is BreakerState.OPEN
    assert breaker.acquire() is None
    clock.now += 4.9
    assert breaker.acquire() is None and not breaker.available()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    breaker.record(trial, Outcome.SUCCESS)
    assert breaker.state is BreakerState.CLOSED
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_half_open_admits_a_few_trials_and_a_failed_trial_reopens() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock)
    breaker.trip()
    clock.now += 5
    first, second = breaker.acquire(), breaker.acquire()
    assert first is not None and second is not None
    assert breaker.acquire() is None  # half_open_probes = 2 at once
    breaker.record(first, Outcome.NEUTRAL)  # e.g. the caller went away: the slot comes back
    assert breaker.state is BreakerState.HALF_OPEN
    third = breaker.acquire()
    assert third is not None
    breaker.record(second, Outcome.FAILURE)
    assert breaker.state is BreakerState.OPEN
    breaker.record(third, Outcome.SUCCESS)  # a trial of the earlier half-open spell decides nothing
    assert breaker.state is BreakerState.OPEN
    clock.now += 4.9  # the cool-down restarted at the failed trial
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN


def test_failure_rate_over_the_window_opens_and_old_outcomes_age_out() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock)
    for outcome in [Outcome.FAILURE, Outcome.SUCCESS] * 2 + [Outcome.FAILURE]:
        _run(breaker, outcome)
    assert breaker.state is BreakerState.CLOSED  # 3 of 5: too few requests to judge a rate
    clock.now += 11  # those five leave the window
    for outcome in [Outcome.SUCCESS, Outcome.FAILURE] * 2 + [Outcome.SUCCESS]:
        _run(breaker, outcome)
    assert breaker.state is BreakerState.CLOSED  # 2 of 5
    _run(breaker, Outcome.FAILURE)  # 3 of 6 = 0.5, never 3 in a row
    assert breaker.state is BreakerState.OPEN


def test_requests_admitted_before_a_transition_do_not_decide() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock)
    old = breaker.acquire()
    assert old is not None
    breaker.trip()
    clock.now += 5
    breaker.record(old, Outcome.SUCCESS)  # began while closed, ended while half-open
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(Permit(trial=False, epoch=breaker.transitions), Outcome.NEUTRAL)
    assert breaker.state is BreakerState.HALF_OPEN


def _pool(
    *sources: FakeSource,
    clock: Clock | None = None,
    slack: int = 2,
    rng: random.Random | None = None,
) -> NodePool:
    placement = {"m": Placement("tm", tuple(s.name for s in sources))}
    return NodePool(
        {s.name: s for s in sources},
        placement,
        breaker=SETTINGS,
        clock=clock or Clock(),
        rng=rng or Ordered(),
        affinity_slack=slack,
    )


def _hold(pool: NodePool, node: str, count: int, into: MutableSequence[Lease]) -> None:
    """Put ``count`` requests in flight on ``node``."""
    for _ in range(count):
        lease = pool.pick("m", exclude=[n.node for n in pool.status() if n.node != node])
        assert lease is not None and lease.node == node
        into.append(lease)


async def test_least_busy_of_two_random_nodes_never_the_busiest() -> None:
    pool = _pool(FakeSource("a"), FakeSource("b"), FakeSource("c"), rng=random.Random(7))
    await pool.probe_once()
    held: list[Lease] = []
    _hold(pool, "a", 5, held)
    _hold(pool, "b", 1, held)
    chosen = []
    for _ in range(200):
        lease = pool.pick("m")
        assert lease is not None
        chosen.append(lease.node)
        lease.release(Outcome.SUCCESS)
    assert "a" not in chosen  # whichever pair is drawn, a loses
    assert chosen.count("c") > chosen.count("b") > 0  # b wins only when drawn with a


async def test_skips_not_ready_and_open_nodes_and_a_half_open_one_gets_a_trial() -> None:
    clock = Clock()
    a, b = FakeSource("a"), FakeSource("b")
    pool = _pool(a, b, clock=clock)
    b.is_ready = False
    await pool.probe_once()
    assert pool.breaker("b").state is BreakerState.OPEN  # ready for none of its models: tripped
    lease = pool.pick("m")
    assert lease is not None and lease.node == "a"
    lease.release(Outcome.FAILURE, node_down=True)
    assert pool.pick("m") is None and not pool.ready("m")  # a is out of rotation at once
    a.is_ready = b.is_ready = True
    await pool.probe_once()
    assert pool.pick("m", exclude=["a"]) is None  # b is ready but its breaker is open
    clock.now += SETTINGS.cooldown_s
    trial = pool.pick("m", exclude=["a"])
    assert trial is not None and trial.node == "b"
    assert pool.breaker("b").state is BreakerState.HALF_OPEN
    trial.release(Outcome.SUCCESS)
    assert pool.breaker("b").state is BreakerState.CLOSED
    assert [(s.node, s.breaker, s.ready_models) for s in pool.status()] == [
        ("a", BreakerState.CLOSED, ("tm",)),
        ("b", BreakerState.CLOSED, ("tm",)),
    ]


async def test_prefix_affinity_sticks_to_one_node_until_it_is_busier_than_the_slack() -> None:
    nodes = [FakeSource(n) for n in ("a", "b", "c", "d")]
    pool = _pool(*nodes, slack=2)
    await pool.probe_once()
    first = pool.pick("m", affinity="You are a helpful")
    assert first is not None
    held = [first]
    for _ in range(2):
        again = pool.pick("m", affinity="You are a helpful")
        assert again is not None and again.node == first.node
        held.append(again)
    other = pool.pick("m", affinity="You are a helpful")  # 3 in flight there, 0 elsewhere
    assert other is not None and other.node != first.node
    keys = {f"prefix {i}" for i in range(40)}
    spread = set()
    for key in keys:
        lease = pool.pick("m", exclude=[first.node, other.node], affinity=key)
        assert lease is not None
        spread.add(lease.node)
        lease.release(Outcome.SUCCESS)
    assert len(spread) == 2  # different prefixes spread over the nodes


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.NEUTRAL])
async def test_a_lease_counts_in_flight_until_released_once(outcome: Outcome) -> None:
    pool = _pool(FakeSource("a"))
    await pool.probe_once()
    lease = pool.pick("m")
    assert lease is not None and pool.in_flight("a") == 1
    lease.release(outcome)
    lease.release(Outcome.FAILURE)  # ignored
    assert pool.in_flight("a") == 0
    assert pool.breaker("a").state is BreakerState.CLOSED


def test_a_node_that_never_fails_keeps_only_its_windows_outcomes() -> None:
    # Outcomes were aged out only when judging a failure: a healthy node kept every request's.
    clock = Clock()
    breaker, _ = _breaker(clock)
    for _ in range(10_000):
        _run(breaker, Outcome.SUCCESS)
        clock.now += 0.1  # 10,000 requests over 1,000 s; the window is 10 s
    assert len(breaker._window) <= 101
    clock.now += 20  # those leave the window: the rate is judged on what came after
    for outcome in [Outcome.FAILURE, Outcome.SUCCESS] * 2 + [Outcome.FAILURE, Outcome.SUCCESS]:
        _run(breaker, outcome)
    assert breaker.state is BreakerState.CLOSED  # 3 of 6 (the sixth a success)
    _run(breaker, Outcome.FAILURE)  # 4 of 7, never 3 in a row
    assert breaker.state is BreakerState.OPEN
