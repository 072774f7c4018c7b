"""The orchestrator and the edge as several worker processes on one port each: limits and
metrics hold for the group, and a taken port is still refused.

The kernel spreads connections over the workers (SO_REUSEPORT), so each test opens many
connections: with two workers, all of them landing on one worker is a 1-in-2^(n-1) chance, and
the tests check that both workers served.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from _support import REPO, wait_until
from tokenrelay.config import (
    Admission,
    EdgeSettings,
    OrchestratorSettings,
    Retrieval,
    Settings,
    to_toml,
)
from tokenrelay.security import hash_key
from tokenrelay.stack import Stack, StackPorts, free_port
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

ONE_STREAM = "tr-" + "a" * 43  # at most one request in flight
THREE_PER_MINUTE = "tr-" + "b" * 43
KEYS = f"""
[[keys]]
id = "one-stream"
sha256 = "{hash_key(ONE_STREAM)}"
max_streams = 1

[[keys]]
id = "three-per-minute"
sha256 = "{hash_key(THREE_PER_MINUTE)}"
requests_per_minute = 3
"""

# The orchestrator's processes on this machine's first core, the edge's on the second (with one
# core, both on it).
_CORES = sorted(os.sched_getaffinity(0))
FIRST, SECOND = _CORES[0], _CORES[min(1, len(_CORES) - 1)]
ORCHESTRATOR_CPUS = str(FIRST)
EDGE_CPUS = str(SECOND)
HEALTH: dict[str, str] = {}  # each service's health_listen, chosen by the fixture


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("workers")
    keys = directory / "keys.toml"
    keys.write_text(KEYS)
    HEALTH.update(orchestrator=f"127.0.0.1:{free_port()}", edge=f"127.0.0.1:{free_port()}")
    settings = Settings(
        orchestrator=OrchestratorSettings(
            workers=2,
            admission=Admission(max_concurrent=2, max_queue=0),
            cpus=ORCHESTRATOR_CPUS,
            health_listen=HEALTH["orchestrator"],
        ),
        edge=EdgeSettings(
            workers=2,
            api_keys_file=str(keys),
            cpus=EDGE_CPUS,
            health_listen=HEALTH["edge"],
        ),
        retrieval=Retrieval(store="none"),
    )
    config = directory / "tokenrelay.toml"
    config.write_text(to_toml(settings))
    with Stack(
        REPO / "triton_models",
        StackPorts.free(),
        models=("synthetic",),
        config=config,
        fast_stop=True,
    ) as stack:
        yield stack


def _child_pids(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _children(pid: int) -> list[str]:
    return [
        Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ") for child in _child_pids(pid)
    ]


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes that listen on ``port`` (TCP, IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _cores_of(pid: int) -> set[frozenset[int]]:
    """The core sets the threads of ``pid`` may run on (one set when all agree)."""
    return {
        frozenset(os.sched_getaffinity(int(task.name)))
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


def _samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1))))
            found[labels] = float(match.group(2))
    return found


def test_each_service_runs_as_that_many_workers(workers: Stack) -> None:
    assert workers.orchestrator is not None and workers.edge is not None
    for process, module in ((workers.orchestrator, "orchestrator"), (workers.edge, "edge")):
        children = _children(process.pid)
        assert len(children) == 2, children
        assert all(f"tokenrelay.{module} --worker" in c for c in children)


@pytest.mark.parametrize("service", ["orchestrator", "edge"])
def test_every_worker_answers_probes_on_the_health_port(workers: Stack, service: str) -> None:
    address = HEALTH[service]
    port = int(address.rsplit(":", 1)[1])
    process = getattr(workers, service)
    assert process is not None
    listening = _listening_inodes(port)
    # Each worker listens there itself (SO_REUSEPORT): a probe reaches whichever the kernel picks.
    for child in _child_pids(process.pid):
        assert _socket_inodes(child) & listening, f"worker {child} does not listen on {port}"
    # A second orchestrator worker may still be probing its node when the stack is ready (its
    # /readyz is then rightly 503): wait until probes, spread over both, all say ready.
    url = f"http://{address}"
    assert wait_until(
        lambda: all(_status(f"{url}/readyz") == 200 for _ in range(8)), timeout_s=10
    ), "not every worker became ready on the health port"
    assert all(_status(f"{url}/healthz") == 200 for _ in range(8))
    assert _status(f"{url}/metrics") == 404  # the probes only


def test_cpus_keeps_every_process_and_thread_of_a_service_on_its_cores(workers: Stack) -> None:
    assert workers.orchestrator is not None and workers.edge is not None
    for supervisor, cores in (
        (workers.orchestrator.pid, frozenset({FIRST})),
        (workers.edge.pid, frozenset({SECOND})),
    ):
        pids = _child_pids(supervisor)
        assert len(pids) == 2
        for pid in (supervisor, *pids):
            assert _cores_of(pid) == {cores}  # gRPC's threads too


async def _generation(address: str) -> str:
    # A channel of its own (no shared subchannel): a connection of its own.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.GenerateStreamRequest(
            model="synthetic", prompt="hello", sampling=pb.SamplingParams(max_tokens=60)
        )
        try:
            async for message in stub.GenerateStream(request, timeout=60):
                if message.HasField("end"):
                    return "done"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return "ended early"


async def test_admission_is_one_limit_for_all_workers(workers: Stack) -> None:
    # max_concurrent = 2 for the orchestrator, whatever the number of workers.
    outcomes = await asyncio.gather(*(_generation(workers.orchestrator_address) for _ in range(12)))
    assert sorted(outcomes) == ["RESOURCE_EXHAUSTED"] * 10 + ["done"] * 2
    for _ in range(5):  # a sibling slow to answer is left out of one scrape, not of all
        requests = _samples(workers.orchestrator_metrics_url, "tokenrelay_requests_total")
        by_worker: dict[str, float] = {}
        for labels, value in requests.items():
            by_worker[dict(labels)["worker"]] = by_worker.get(dict(labels)["worker"], 0) + value
        if len(by_worker) == 2:
            break
    assert set(by_worker) == {"0", "1"} and all(by_worker.values()), requests
    overloaded = sum(v for k, v in requests.items() if ("outcome", "overloaded") in k)
    assert overloaded == 10


async def _chat(url: str, key: str, max_tokens: int) -> int:
    # A session of its own per request: a connection of its own.
    body = {
        "model": "synthetic",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        await response.read()
        return response.status


async def test_a_keys_concurrent_requests_are_counted_across_edge_workers(workers: Stack) -> None:
    statuses = await asyncio.gather(*(_chat(workers.edge_url, ONE_STREAM, 60) for _ in range(8)))
    assert sorted(statuses) == [200] + [429] * 7
    served = _samples(f"{workers.edge_url}/metrics", "tokenrelay_edge_requests_total")
    chat = {
        dict(labels)["worker"]
        for labels in served
        if dict(labels)["route"] == "/v1/chat/completions"
    }
    assert chat == {"0", "1"}, served


async def test_a_keys_request_rate_is_counted_across_edge_workers(workers: Stack) -> None:
    statuses = [await _chat(workers.edge_url, THREE_PER_MINUTE, 1) for _ in range(6)]
    assert statuses == [200] * 3 + [429] * 3


@pytest.mark.parametrize("taken", ["listen", "health_listen"])
@pytest.mark.parametrize("count", [1, 2])
def test_a_port_the_workers_hold_is_refused(
    workers: Stack, tmp_path: Path, count: int, taken: str
) -> None:
    config = tmp_path / "tokenrelay.toml"
    settings = Settings(
        orchestrator=OrchestratorSettings(workers=count), retrieval=Retrieval(store="none")
    )
    config.write_text(to_toml(settings))
    listen, health = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    if taken == "listen":
        listen = workers.orchestrator_address
    else:
        health = HEALTH["orchestrator"]
    env = {
        **os.environ,
        "TOKENRELAY_CONFIG": str(config),
        "TOKENRELAY_ORCHESTRATOR_LISTEN": listen,
        "TOKENRELAY_ORCHESTRATOR_HEALTH": health,
        "TOKENRELAY_ORCHESTRATOR_METRICS": "",
        "TOKENRELAY_TRITON": ",".join(workers.triton_addresses),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tokenrelay.orchestrator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "cannot listen" in done.stderr or "Address already in use" in done.stderr, done.stderr
    assert workers.orchestrator is not None and workers.orchestrator.poll() is None
    assert len(_children(workers.orchestrator.pid)) == 2


class _Refuser:
    """Listens on ``port`` and closes each connection at once, noting when it came: a gRPC
    channel pointed here fails to connect, and tries again when its backoff says."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_server(("127.0.0.1", port))
        self._socket.settimeout(0.05)
        self.attempts: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.attempts.append(time.monotonic())
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def test_an_edge_started_before_its_orchestrator_finds_it_within_a_second_or_two(
    workers: Stack, tmp_path: Path
) -> None:
    # gRPC's default backoff after failed connections reaches seconds (up to 120 s), with
    # every call failing meanwhile; the edge's channel tries again within a second.
    from tokenrelay.stack import free_port

    edge_port, orchestrator_port = free_port(), free_port()
    # Single processes on probe ports of their own: they say what the API ports say.
    edge_probes, orchestrator_probes = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    config = tmp_path / "tokenrelay.toml"
    config.write_text(to_toml(Settings(retrieval=Retrieval(store="none"))))
    env = {
        **os.environ,
        "TOKENRELAY_CONFIG": str(config),
        "TOKENRELAY_EDGE_HEALTH": edge_probes.removeprefix("http://"),
        "TOKENRELAY_ORCHESTRATOR_HEALTH": orchestrator_probes.removeprefix("http://"),
        "TOKENRELAY_EDGE_LISTEN": f"127.0.0.1:{edge_port}",
        "TOKENRELAY_EDGE_ORCHESTRATOR": f"127.0.0.1:{orchestrator_port}",
        "TOKENRELAY_ORCHESTRATOR_LISTEN": f"127.0.0.1:{orchestrator_port}",
        "TOKENRELAY_ORCHESTRATOR_METRICS": "",
        "TOKENRELAY_TRITON": ",".join(workers.triton_addresses),
    }
    log = (tmp_path / "services.log").open("wb")
    refuser = _Refuser(orchestrator_port)
    edge = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.edge"], env=env, stdout=log, stderr=log
    )
    orchestrator = None
    try:
        # The edge's channel fails to connect again and again. With gRPC's default backoff
        # (1 s, then 1.6 times longer each time) its 8th attempt would come 43 s after the
        # first; the edge's, capped at 1 s, within a few seconds.
        attempts = refuser.attempts
        reached = wait_until(lambda: len(attempts) >= 8, timeout_s=30, step_s=0.05)
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(attempts)]
        assert reached and max(gaps[-3:]) < 2.0, f"attempts {len(attempts)}, gaps {gaps}"
        # Alive, and not ready: no orchestrator yet.
        assert _status(f"{edge_probes}/healthz") == 200
        assert _status(f"{edge_probes}/readyz") == 503
        refuser.close()
        orchestrator = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay.orchestrator"], env=env, stdout=log, stderr=log
        )
        assert wait_until(
            lambda: _serving(f"127.0.0.1:{orchestrator_port}"), timeout_s=30, step_s=0.05
        ), "the orchestrator did not start"
        serving = time.monotonic()
        while _status(f"http://127.0.0.1:{edge_port}/readyz") != 200:
            assert time.monotonic() - serving < 2.5, "the edge did not find its orchestrator"
            time.sleep(0.05)
        assert _status(f"{orchestrator_probes}/readyz") == 200
        assert _status(f"{orchestrator_probes}/healthz") == 200
        assert wait_until(lambda: _status(f"{edge_probes}/readyz") == 200, timeout_s=2)
    finally:
        refuser.close()
        for process in (edge, orchestrator):
            if process is not None:
                process.terminate()
                process.wait(30)
        log.close()


def _serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_workers_of_a_supervisor_killed_with_sigkill_stop_and_free_the_port(
    tmp_path: Path,
) -> None:
    # SIGKILL forwards nothing: without a parent-death signal the workers went on holding the
    # port (orphans of init, their coordinator gone), and a new edge was refused it.
    port, probes = free_port(), f"127.0.0.1:{free_port()}"
    config = tmp_path / "tokenrelay.toml"
    settings = Settings(edge=EdgeSettings(workers=2), retrieval=Retrieval(store="none"))
    config.write_text(to_toml(settings))
    env = {
        **os.environ,
        "TOKENRELAY_CONFIG": str(config),
        "TOKENRELAY_EDGE_LISTEN": f"127.0.0.1:{port}",
        "TOKENRELAY_EDGE_HEALTH": probes,
        "TOKENRELAY_EDGE_ORCHESTRATOR": f"127.0.0.1:{free_port()}",
    }
    log = (tmp_path / "edge.log").open("wb")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.edge"], env=env, stdout=log, stderr=log
    )
    workers: list[int] = []
    try:
        assert wait_until(lambda: len(_child_pids(supervisor.pid)) == 2, timeout_s=30)
        assert wait_until(lambda: _status(f"http://{probes}/healthz") == 200, timeout_s=30)
        workers = _child_pids(supervisor.pid)
        supervisor.kill()
        supervisor.wait(10)
        assert wait_until(lambda: not any(_running(pid) for pid in workers), timeout_s=15), (
            "the workers outlived their supervisor"
        )
        with socket.create_server(("127.0.0.1", port)):
            pass  # free again
    finally:
        supervisor.kill()
        supervisor.wait(10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        log.close()
