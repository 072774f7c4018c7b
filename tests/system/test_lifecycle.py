"""Process lifecycle: draining on SIGTERM, and Triton going away under a running stack."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from _support import REPO, assert_openai, wait_until
from tokenrelay.config import ModelSpec, Retrieval, Settings, to_toml
from tokenrelay.stack import Stack, StackPorts, free_port
from tokenrelay.stack._stack import TRITON_EXIT_S
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.chaos


@pytest.fixture
def own_stack() -> Iterator[Stack]:
    """A stack of its own (these tests stop its parts), with only the synthetic model. What is
    left of it at the end is killed (fast_stop): the tests assert the stops they make themselves."""
    with Stack(
        REPO / "triton_models", StackPorts.free(), models=("synthetic",), fast_stop=True
    ) as running:
        yield running


def test_sigterm_drains_in_flight_streams_and_exits_0(own_stack: Stack) -> None:
    results: list[pb.GenerateStreamResponse | Exception] = []
    started = threading.Barrier(9)

    def stream() -> None:
        with grpc.insecure_channel(own_stack.orchestrator_address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateStreamRequest(
                model="synthetic", prompt="go", sampling=pb.SamplingParams(max_tokens=50)
            )
            try:
                messages = iter(stub.GenerateStream(request, timeout=30))
                last = next(messages)
                started.wait()
                for last in messages:  # noqa: B007 - the last message is the result
                    pass
                results.append(last)
            except Exception as exc:  # recorded and asserted below
                results.append(exc)

    workers = [threading.Thread(target=stream) for _ in range(8)]
    for worker in workers:
        worker.start()
    started.wait(timeout=10)
    assert own_stack.orchestrator is not None
    own_stack.orchestrator.send_signal(signal.SIGTERM)

    # New work is refused while the in-flight streams finish.
    def refused() -> bool:
        with grpc.insecure_channel(own_stack.orchestrator_address) as channel:
            try:
                pb_grpc.GenerationServiceStub(channel).Generate(
                    pb.GenerateRequest(model="synthetic", prompt="late"), timeout=2
                )
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined, no-any-return]
            return False

    assert wait_until(refused)
    for worker in workers:
        worker.join(timeout=20)
    assert len(results) == 8
    for last in results:
        assert isinstance(last, pb.GenerateStreamResponse), last
        assert last.end.usage.completion_tokens == 50
    assert own_stack.orchestrator.wait(timeout=10) == 0
    assert Stack.terminate(own_stack.edge) == 0


def test_triton_stopped_means_not_ready_and_fast_503(own_stack: Stack) -> None:
    edge = own_stack.edge_url
    assert httpx.get(f"{edge}/readyz").status_code == 200
    Stack.terminate(own_stack.triton, timeout_s=5)
    deadline = time.monotonic() + 5
    while httpx.get(f"{edge}/readyz").status_code != 503:
        assert time.monotonic() < deadline, "/readyz still says ready"
        time.sleep(0.1)
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True):
        began = time.monotonic()
        response = httpx.post(
            f"{edge}/v1/chat/completions", json={**body, "stream": stream}, timeout=10
        )
        assert time.monotonic() - began < 1.0
        assert response.status_code == 503
        assert_openai("ErrorResponse", response.json())
    assert httpx.get(f"{edge}/healthz").status_code == 200  # the edge itself is alive


def test_triton_that_served_finished_streams_stops_at_once_and_exits_0(own_stack: Stack) -> None:
    """A stream read to its final response must end at Triton as finished, not cancelled (over
    the orchestrator's gRPC API and through the edge): a
    cancel sent before the call's status arrived left Triton waiting, at stop, for requests it
    had long answered ("CANCELLATION_ISSUED"), its whole exit timeout, then exit code 1 — on
    Ctrl-C of ``make run`` and on every node stop."""

    def stream(index: int) -> int:
        request = pb.GenerateStreamRequest(
            model="synthetic", prompt=f"go {index}", sampling=pb.SamplingParams(max_tokens=3)
        )
        *_, last = stub.GenerateStream(request, timeout=30)
        return int(last.end.usage.completion_tokens)

    def through_the_edge(index: int) -> int:
        """The edge closes its call to the orchestrator once it has the answer's end: that
        cancellation must not reach Triton's call as one either."""
        body = {
            "model": "synthetic",
            "stream": True,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": f"go {index}"}],
        }
        with httpx.stream(
            "POST", f"{own_stack.edge_url}/v1/chat/completions", json=body, timeout=30
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        return len(lines) - 2  # the role chunk first, [DONE] last

    with grpc.insecure_channel(own_stack.orchestrator_address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(stream, range(64))) == [3] * 64
            counts = list(pool.map(through_the_edge, range(64)))
    assert all(count >= 3 for count in counts), counts
    assert own_stack.triton is not None
    began = time.monotonic()
    code = Stack.terminate(own_stack.triton, timeout_s=TRITON_EXIT_S + 5)
    took = time.monotonic() - began
    assert code == 0
    assert took < TRITON_EXIT_S / 2, f"Triton took {took:.1f} s to stop"


def test_sigterm_to_the_edge_lets_its_sse_streams_finish_and_exits_0(own_stack: Stack) -> None:
    body = {"model": "synthetic", "prompt": "go", "max_tokens": 50, "stream": True}
    texts: list[str | Exception] = []
    started = threading.Barrier(5)

    def stream() -> None:
        try:
            with httpx.stream(
                "POST", f"{own_stack.edge_url}/v1/completions", json=body, timeout=30
            ) as response:
                lines = response.iter_lines()
                first = next(lines)
                started.wait()
                texts.append("\n".join([first, *lines]))
        except Exception as exc:  # recorded and asserted below
            texts.append(exc)

    workers = [threading.Thread(target=stream) for _ in range(4)]
    for worker in workers:
        worker.start()
    started.wait(timeout=10)
    assert own_stack.edge is not None
    own_stack.edge.send_signal(signal.SIGTERM)

    def refused() -> bool:  # no new connections while draining
        try:
            httpx.get(f"{own_stack.edge_url}/healthz", timeout=2)
        except httpx.ConnectError:
            return True
        return False

    assert wait_until(refused)
    for worker in workers:
        worker.join(timeout=20)
    assert len(texts) == 4
    for text in texts:
        assert isinstance(text, str), text
        assert text.rstrip().endswith("data: [DONE]")
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in text.splitlines()
            if line.startswith("data: {")
        ]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert own_stack.edge.wait(timeout=10) == 0


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            if int(fields.get("PPid", "0")) == pid:
                found.add(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for its parent to reap it


def test_a_killed_launcher_takes_every_component_with_it(tmp_path: Path) -> None:
    ports = StackPorts.free()
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenrelay.stack",
            "--model-repository",
            str(REPO / "triton_models"),
            "--workdir",
            str(tmp_path),
            "--edge-port",
            str(ports.edge),
            "--orchestrator-port",
            str(ports.orchestrator),
            "--triton-ports",
            *(str(p) for p in (ports.triton.http, ports.triton.grpc, ports.triton.metrics)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TOKENRELAY_ORCHESTRATOR_METRICS": f"127.0.0.1:{free_port()}"},
    )
    try:
        assert launcher.stdout is not None
        for line in launcher.stdout:  # until the stack says it is ready
            if b"tokenrelay is ready" in line:
                break
        components = _children(launcher.pid)
        stubs = {stub for c in components for stub in _children(c)}  # Triton's model stubs
        assert len(components) == 3 and stubs
        regions = [r for c in components for r in _shared_memory_of(c)]
        assert regions  # Triton's Python backend: its stubs talk to it through them
        launcher.kill()  # no chance to stop anything itself
        launcher.wait()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in components | stubs):
            assert time.monotonic() < deadline, [p for p in components | stubs if _alive(p)]
            time.sleep(0.1)
        # Not left in /dev/shm (RAM) for as long as the machine runs: Triton stopped, not killed.
        assert [r for r in regions if r.exists()] == []
    finally:
        launcher.kill()
        launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()


def _shared_memory_of(pid: int) -> list[Path]:
    """The /dev/shm regions of process ``pid`` if it is a tritonserver (none otherwise)."""
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    option = "shm-region-prefix-name="
    prefixes = [a.partition(option)[2] for a in argv if option in a]
    return sorted(r for prefix in prefixes for r in Path("/dev/shm").glob(f"{prefix}*"))


def _shared_memory(process: subprocess.Popen[bytes]) -> list[Path]:
    """The /dev/shm regions of a tritonserver's Python backend (named by its prefix option)."""
    option = "shm-region-prefix-name="
    assert isinstance(process.args, list)
    (prefix,) = (str(a).partition(option)[2] for a in process.args if option in str(a))
    return sorted(Path("/dev/shm").glob(f"{prefix}*"))


def test_stopping_a_stack_whose_triton_hangs_is_bounded(own_stack: Stack) -> None:
    node = own_stack.nodes[0]
    assert node.process is not None
    stubs = _children(node.process.pid)
    assert _shared_memory(node.process)
    node.pause()  # hung: SIGTERM alone would never end it
    own_stack.fast_stop = False  # the graceful stop, bounded, is what this test is about
    began = time.monotonic()
    own_stack.stop()
    assert time.monotonic() - began < TRITON_EXIT_S + 10
    assert node.process.poll() is not None
    assert not any(_alive(p) for p in stubs)
    assert not _shared_memory(node.process)  # RAM, until the machine restarts


def test_a_fast_stopped_stack_leaves_no_process_and_no_shared_memory() -> None:
    """``fast_stop`` (the test stacks that no test watches stop): everything killed at once."""
    with Stack(
        REPO / "triton_models", StackPorts.free(), models=("synthetic",), fast_stop=True
    ) as stack:
        assert stack.edge is not None and stack.orchestrator is not None
        assert stack.triton is not None
        triton = stack.triton
        components = {stack.edge.pid, stack.orchestrator.pid, triton.pid}
        stubs = _children(triton.pid)
        assert stubs and _shared_memory(triton)
    assert not any(_alive(p) for p in components | stubs)
    assert not _shared_memory(triton)


def test_the_launcher_with_two_nodes_serves_from_both_and_stops_them_all(tmp_path: Path) -> None:
    """``tokenrelay-stack --nodes 2`` (``make run NODES=2``): two Triton nodes, same models."""
    repository = tmp_path / "models"
    shutil.copytree(REPO / "triton_models" / "synthetic", repository / "synthetic")
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        to_toml(
            Settings(
                models=(ModelSpec("synthetic", "synthetic"),), retrieval=Retrieval(store="none")
            )
        )
    )
    ports = StackPorts.free()
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenrelay.stack",
            "--nodes",
            "2",
            "--config",
            str(config),
            "--model-repository",
            str(repository),
            "--workdir",
            str(tmp_path / "run"),
            "--edge-port",
            str(ports.edge),
            "--orchestrator-port",
            str(ports.orchestrator),
            "--orchestrator-metrics-port",
            str(ports.orchestrator_metrics),
            "--orchestrator-frames-port",
            str(ports.orchestrator_frames),
            "--triton-ports",
            *(str(p) for p in (ports.triton.http, ports.triton.grpc, ports.triton.metrics)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        banner = []
        for line in launcher.stdout:
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        tritons = [line.split() for line in banner if line.strip().startswith("Triton ")]
        assert len(tritons) == 2, "".join(banner)
        assert tritons[0][1] == f"http://127.0.0.1:{ports.triton.http}"
        assert any("Watch failover" in line for line in banner)
        with grpc.insecure_channel(f"127.0.0.1:{ports.orchestrator}") as channel:
            status = pb_grpc.GenerationServiceStub(channel).Status(pb.StatusRequest(), timeout=5)
        assert len(status.nodes) == 2
        assert all(list(n.ready_models) == ["synthetic"] for n in status.nodes)
        components = _children(launcher.pid)
        assert len(components) == 4  # two Triton nodes, the orchestrator, the edge
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
        assert not any(_alive(p) for p in components)
    finally:
        launcher.kill()
        launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()
