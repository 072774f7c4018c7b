"""Where a service's processes run: ``cpus`` of ``[edge]`` and ``[orchestrator]``.

A process of either service has several threads that hand every gRPC event to each other: the
event loop, gRPC's completion-queue poller and the gRPC core's own. On a virtual machine whose
idle cores halt, waking a thread on another, idle core costs ~100 µs, several times per event.
Pinned to one core, the threads wake each other where one of them is already running. Measured
on the lent H200 host (16 cores, KVM, 2026-12-02): the time to first token the relay adds at one
stream went from +2.5 / +3.8 ms (edge and orchestrator sharing 4 cores) to +0.8 / +1.6 ms (one
core each), with no loss of tok/s at 64 and 256 streams (README, "Performance").
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["parse_cpus", "place", "spell"]


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"12-15,3"`` → ``(12, 13, 14, 15, 3)``, in the order written, each core once;
    ``""`` → ``()``. Raises ``ValueError`` for anything else."""
    cores: list[int] = []
    for part in text.split(",") if text.strip() else ():
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"expected core numbers and ranges like '0-3,8', got {text!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"the range {part.strip()!r} runs backwards")
        cores += [c for c in range(first, last + 1) if c not in cores]
    return tuple(cores)


def spell(cores: set[int] | tuple[int, ...]) -> str:
    """``{0, 1, 2, 5}`` → ``"0-2,5"``."""
    runs: list[list[int]] = []
    for core in sorted(cores):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def place(cpus: tuple[int, ...], index: int | None, supervisor: bool = False) -> set[int] | None:
    """Pin this process, every thread of it, as ``cpus`` asks: a supervisor on all of them, a
    worker (``index``) on the index-th core of the list (wrapping round), a process serving alone
    (``index`` None) on the first. Nothing with ``cpus`` empty. The cores the process inherited
    (``taskset``) do not limit the list; the machine's cores and its cpuset do. Returns the cores
    it runs on now; raises ``ValueError`` naming a listed core it may not run on."""
    if not cpus:
        return None
    count = os.cpu_count() or 1
    absent = [c for c in cpus if c >= count]
    if absent:
        raise ValueError(
            f"cpus names core(s) {spell(tuple(absent))},"
            f" but this machine has {spell(set(range(count)))}"
        )
    chosen = set(cpus) if supervisor else {cpus[(index or 0) % len(cpus)]}
    try:
        os.sched_setaffinity(0, chosen)
    except OSError:  # none of them in this process's cpuset
        raise ValueError(
            f"cpus: this process may not run on core(s) {spell(chosen)} (its cpuset)"
        ) from None
    refused = chosen - os.sched_getaffinity(0)  # the cpuset's cores only, silently
    if refused:
        raise ValueError(f"cpus: this process may not run on core(s) {spell(refused)} (its cpuset)")
    # sched_setaffinity(0) moved the calling thread only: move every other there is (gRPC's
    # start later and inherit it).
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), chosen)
    return chosen
