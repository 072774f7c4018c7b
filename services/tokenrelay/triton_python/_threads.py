"""How many threads llama.cpp decodes with: one, or ``n_threads``, whichever this host is timed
to do faster when the model loads.

Which is faster depends on the host more than on the model. A step of one token on two threads
meets a barrier at every operation of the graph (hundreds a step); where waking a waiting thread
is slow (a VM's halted vCPU, OpenMP's passive waits) one thread is faster: 6.8 against 22.8 ms a
step on one 2-vCPU machine, while another measured 32.5 against 26.5 ms the other way. Larger
steps have more work between barriers and usually gain from a second thread.

The count is chosen once and kept for the life of the model instance, not step by step: with a
longer context llama.cpp's results depend on the thread count (flash attention splits its sums
by thread), so a sequence must not move between counts, and a batch must decode on the count a
sequence alone would get. Not thread-safe: called before the engine thread starts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

__all__ = ["choose_threads"]


def choose_threads(
    threads: int, time_step: Callable[[int, int], float], *, batch: int, rounds: int = 3
) -> tuple[int, dict[int, tuple[float, float]]]:
    """The thread count, 1 or ``threads``, whose steps of one token plus steps of ``batch``
    tokens take less time, and the median seconds of each kind for each count.

    ``time_step(threads, tokens)`` decodes one step of ``tokens`` tokens on ``threads`` threads
    and returns how long it took. Each kind is timed ``rounds`` times for each count, the counts
    alternating so that a passing disturbance touches both; a tie keeps ``threads``.
    """
    if threads < 1:
        raise ValueError("n_threads must be at least 1")
    if threads == 1:
        return 1, {}
    samples: dict[int, tuple[list[float], list[float]]] = {threads: ([], []), 1: ([], [])}
    for _ in range(rounds):
        for count, (single, batched) in samples.items():
            single.append(time_step(count, 1))
            batched.append(time_step(count, batch))
    medians = {
        count: (statistics.median(single), statistics.median(batched))
        for count, (single, batched) in samples.items()
    }
    best = min(medians, key=lambda count: (sum(medians[count]), count != threads))
    return best, medians
