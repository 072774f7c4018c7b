"""How many threads llama.cpp decodes with (one, or ``n_threads``), and up to how many decoding
sequences it is faster to decode one by one than in one step: whichever this host is timed to
do faster when the model loads.

Which is faster depends on the host more than on the model. A step of one token on two threads
meets a barrier at every operation of the graph (hundreds a step); where waking a waiting thread
is slow (a VM's halted vCPU, OpenMP's passive waits) one thread is faster: 6.8 against 22.8 ms a
step on one 2-vCPU machine, while another measured 32.5 against 26.5 ms the other way. Larger
steps have more work between barriers and usually gain from a second thread.

The count is chosen once and kept for the life of the model instance, not step by step: with a
longer context llama.cpp's results depend on the thread count (a 200-token prompt gave another
text, greedy, on 1 thread than on 2; flash attention, for one, splits a lone sequence's sums by
thread once its cache passes 512 cells), so a sequence must not move between counts, and a batch
must decode on the count a sequence alone would get. Not thread-safe: called before the engine
thread starts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

__all__ = ["choose_threads", "median_times", "one_by_one_limit"]

# time_step(threads, tokens): decode one step of that many tokens on that many threads; seconds.
TimeStep = Callable[[int, int], float]


def median_times(
    time_step: TimeStep, steps: Sequence[tuple[int, int]], rounds: int = 3
) -> dict[tuple[int, int], float]:
    """The median seconds of each ``(threads, tokens)`` step, each timed ``rounds`` times, all of
    them in turn in every round so that a passing disturbance touches each alike."""
    samples: dict[tuple[int, int], list[float]] = {step: [] for step in steps}
    for _ in range(rounds):
        for (threads, tokens), times in samples.items():
            times.append(time_step(threads, tokens))
    return {step: statistics.median(times) for step, times in samples.items()}


def choose_threads(
    threads: int, time_step: TimeStep, *, batch: int, rounds: int = 3
) -> tuple[int, dict[int, tuple[float, float]]]:
    """The thread count, 1 or ``threads``, whose steps of one token plus steps of ``batch``
    tokens take less time, and the median seconds of each kind for each count.

    Each kind is timed ``rounds`` times for each count, the counts alternating
    (``median_times``); a tie keeps ``threads``.
    """
    if threads < 1:
        raise ValueError("n_threads must be at least 1")
    if threads == 1:
        return 1, {}
    timed = median_times(
        time_step, [(count, tokens) for count in (threads, 1) for tokens in (1, batch)], rounds
    )
    medians = {count: (timed[count, 1], timed[count, batch]) for count in (threads, 1)}
    best = min(medians, key=lambda count: (sum(medians[count]), count != threads))
    return best, medians


def one_by_one_limit(single: float, batched: dict[int, float]) -> int:
    """The most decoding sequences that are faster decoded one by one, a token each, than
    together in one step: the largest measured ``k`` (taken in increasing order, stopping at the
    first that fails) with ``k * single`` under ``batched[k]``; 1 when none is.

    A step of one token goes through llama.cpp's matrix-vector kernels, a step of several through
    its matrix-matrix ones, which on some hosts cost more for two to four tokens than that many
    steps of one (measured: Q8_0 on one thread, 6.7 ms for one token, 29 for two, 36 for four, 35
    for eight).
    """
    limit = 1
    for k in sorted(batched):
        if k < 2:
            continue
        if k * single >= batched[k]:
            break
        limit = k
    return limit
