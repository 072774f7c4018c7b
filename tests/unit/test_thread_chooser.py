"""The CPU model's choice, at load, of one thread or ``n_threads`` from timed decoding steps."""

from __future__ import annotations

import pytest

from tokenrelay.triton_python._threads import choose_threads, one_by_one_limit


class Host:
    """Step times by (threads, tokens), and the order the steps were asked in."""

    def __init__(self, cost: dict[tuple[int, int], float]) -> None:
        self.cost = cost
        self.asked: list[tuple[int, int]] = []

    def __call__(self, threads: int, tokens: int) -> float:
        self.asked.append((threads, tokens))
        return self.cost[threads, tokens]


def test_where_waking_a_thread_is_slow_one_thread_decodes() -> None:
    # The 2-vCPU VM with passive waits: ms per step of 1 and 8 tokens.
    host = Host({(1, 1): 6.8, (1, 8): 34.4, (2, 1): 22.8, (2, 8): 38.0})
    threads, medians = choose_threads(2, host, batch=8)
    assert threads == 1
    assert medians == {1: (6.8, 34.4), 2: (22.8, 38.0)}


def test_where_a_second_thread_pays_it_is_kept() -> None:
    # The same VM with spinning waits: one token alike, eight much faster on two threads.
    host = Host({(1, 1): 6.9, (1, 8): 35.0, (2, 1): 7.1, (2, 8): 25.0})
    assert choose_threads(2, host, batch=8)[0] == 2
    host = Host({(1, 1): 7.0, (1, 8): 30.0, (2, 1): 7.0, (2, 8): 30.0})
    assert choose_threads(2, host, batch=8)[0] == 2  # a tie keeps what was configured


def test_the_counts_alternate_and_one_disturbed_step_does_not_decide() -> None:
    times = iter([6.0, 30.0, 900.0, 60.0] + [6.0, 30.0, 20.0, 40.0] * 2)
    asked: list[tuple[int, int]] = []

    def host(threads: int, tokens: int) -> float:
        asked.append((threads, tokens))
        return next(times)

    threads, medians = choose_threads(4, host, batch=4, rounds=3)
    assert asked[:4] == [(4, 1), (4, 4), (1, 1), (1, 4)]
    assert medians[1] == (20.0, 40.0)  # the 900 ms step is the outlier the median drops
    assert threads == 4


def test_one_thread_times_nothing() -> None:
    host = Host({})
    assert choose_threads(1, host, batch=8) == (1, {})
    assert host.asked == []
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0, host, batch=8)


def test_small_steps_decode_one_by_one_where_that_is_faster() -> None:
    # Q8_0 on one thread on the 2-vCPU VM: ms a step of 1, 2, 4 and 8 tokens.
    assert one_by_one_limit(6.7, {2: 29.0, 4: 36.0, 8: 35.0}) == 4
    # Where a step of several costs little more than one, every step is decoded together.
    assert one_by_one_limit(20.0, {2: 26.0, 4: 34.0, 8: 48.0}) == 1
    # The first size that is not faster one by one ends the search.
    assert one_by_one_limit(10.0, {2: 30.0, 4: 35.0, 8: 90.0}) == 2
