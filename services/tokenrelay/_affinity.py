"""Where a service's processes run: ``cpus`` of ``[edge]`` and ``[orchestrator]``.

On a host that also runs the inference server, the relay and the server compete for cores: vLLM's
engine process keeps a core busy, Triton's stubs and gRPC threads wake on any core. ``cpus``
keeps the service's processes, every thread of them, on cores of their own (give the server the
others: ``taskset``, or Triton's container's cpuset), as the GPU suite runs them.

Every process of the service runs on all the listed cores. One core per process was measured
and not kept (lent H200 hosts, 2026-12-02, ``suite.py pin`` alternating with the edge and the
orchestrator sharing 4 cores, three machines): the relay's added TTFT at one stream was 0.3-0.7 ms
lower per machine, inside the runs' spread (+1.7 to +3.9 ms either way), while one orchestrator on
one core carried 4.7k tok/s of one-token messages where unpinned it carries 8-11k. Listing one
core per service still gives that placement.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

__all__ = ["parse_cpus", "place", "spell"]

log = logging.getLogger(__name__)


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


def place(cpus: tuple[int, ...]) -> set[int] | None:
    """Pin this process, every thread of it, to ``cpus`` (nothing when it is empty). The cores
    the process inherited (``taskset``) do not limit the list; the machine's cores and its cpuset
    do. Returns the cores it runs on now; raises ``ValueError`` naming a listed core it may not
    run on. Logs where it runs."""
    if not cpus:
        return None
    count = os.cpu_count() or 1
    absent = [c for c in cpus if c >= count]
    if absent:
        raise ValueError(
            f"cpus names core(s) {spell(tuple(absent))},"
            f" but this machine has {spell(set(range(count)))}"
        )
    chosen = set(cpus)
    try:
        os.sched_setaffinity(0, chosen)
    except OSError:  # none of them in this process's cpuset
        raise ValueError(
            f"cpus: this process may not run on core(s) {spell(chosen)} (its cpuset)"
        ) from None
    refused = chosen - os.sched_getaffinity(0)  # the cpuset's cores only, silently
    if refused:
        raise ValueError(f"cpus: this process may not run on core(s) {spell(refused)} (its cpuset)")
    # sched_setaffinity(0) moved the calling thread only: move every other there is (threads
    # started later inherit it, and a supervisor's workers too).
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), chosen)
    log.info("pinned", extra={"fields": {"cpus": spell(chosen)}})
    return chosen
