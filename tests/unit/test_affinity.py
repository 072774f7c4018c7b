"""``cpus`` of [edge] and [orchestrator]: the list a user writes, and where it puts a process.

``place`` pins the process it runs in, so each case runs in a child process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from _support import REPO
from tokenrelay._affinity import parse_cpus, spell
from tokenrelay.config import EdgeSettings, OrchestratorSettings

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("", ()),
        ("3", (3,)),
        ("12-15", (12, 13, 14, 15)),
        ("8-9, 2,9", (8, 9, 2)),  # in the order written, each once
    ],
)
def test_a_core_list_is_read_in_the_order_written(text: str, cores: tuple[int, ...]) -> None:
    assert parse_cpus(text) == cores


@pytest.mark.parametrize("text", ["a", "1-", "-2", "3-1", "1,,2", "1.5"])
def test_a_malformed_core_list_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ValueError, match="cpus"):
        EdgeSettings(cpus=text)
    with pytest.raises(ValueError, match="cpus"):
        OrchestratorSettings(cpus=text)


def test_cores_are_spelt_as_ranges() -> None:
    assert spell({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def _placed(cpus: str, inherited: set[int] | None = None) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import os, threading, time
        from pathlib import Path
        from tokenrelay._affinity import parse_cpus, place, spell
        started = threading.Event()
        threading.Thread(target=lambda: (started.set(), time.sleep(5)), daemon=True).start()
        started.wait()
        print(spell(place(parse_cpus({cpus!r})) or set()))
        # every thread, the one started before too
        tasks = [int(t.name) for t in Path("/proc/self/task").iterdir()]
        print(sorted({{spell(os.sched_getaffinity(t)) for t in tasks}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "services")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        preexec_fn=(lambda: os.sched_setaffinity(0, inherited)) if inherited else None,
    )


def test_every_thread_runs_on_the_listed_cores() -> None:
    listed = CORES[:2]
    done = _placed(",".join(map(str, listed)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [spell(set(listed)), str([spell(set(listed))])]


def test_a_core_the_machine_lacks_is_refused_by_name() -> None:
    beyond = os.cpu_count() or 1
    done = _placed(f"{CORES[0]},{beyond}")
    assert done.returncode != 0
    assert f"cpus names core(s) {beyond}, but this machine has" in done.stderr


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
def test_the_cores_a_process_inherited_do_not_limit_the_list() -> None:
    # Started under `taskset -c A` (a load generator's cores), a process listed on B goes to B.
    a, b = CORES[0], CORES[1]
    done = _placed(str(b), inherited={a})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == str(b)
