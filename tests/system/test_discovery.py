"""Node discovery on real processes: two tritonservers (the synthetic model) on 127.0.0.2 and
127.0.0.3 with the same ports, a real DNS server (dnsmasq on a free port, answering from a
hosts file the test rewrites), and an orchestrator whose only node is the DNS name."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from _support import REPO, eventually
from tokenrelay.config import (
    Discovery,
    ModelSpec,
    OrchestratorSettings,
    Retrieval,
    Settings,
    to_toml,
)
from tokenrelay.stack import Stack, TritonPorts, TritonProcess, free_port
from tokenrelay.stack._dns import DnsServer
from tokenrelay.stack._stack import _spawn
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.replicas

NAME = "triton.test"
HOSTS = ("127.0.0.2", "127.0.0.3")


def _free_udp_and_tcp_port() -> int:
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _settings(node: str) -> Settings:
    """An orchestrator whose only node entry is ``node`` (a DNS name), resolved every 0.5 s."""
    return Settings(
        orchestrator=OrchestratorSettings(
            triton=(node,),
            probe_interval_s=0.2,
            discovery=Discovery(interval_s=0.5, timeout_s=1.0),
        ),
        models=(ModelSpec("synthetic", "synthetic", context_window=4096, default_max_tokens=64),),
        retrieval=Retrieval(store="none"),
    )


class Cluster:
    def __init__(self, dns: DnsServer, nodes: list[TritonProcess], address: str, log: Path):
        self.dns = dns
        self.nodes = nodes
        self.address = address
        self.log = log

    def point(self, *hosts: str) -> None:
        self.dns.set({NAME: list(hosts)})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("discovery")
    (folder / "logs").mkdir()
    ports = TritonPorts(free_port(), free_port(), free_port())
    nodes = [
        TritonProcess(f"triton-{h}", REPO / "triton_models", ports, ("synthetic",), folder, host=h)
        for h in HOSTS
    ]
    with DnsServer(_free_udp_and_tcp_port()) as dns:
        dns.set({NAME: [HOSTS[0]]})
        config = folder / "tokenrelay.toml"
        config.write_text(to_toml(_settings(f"dns://{dns.authority}/{NAME}:{ports.grpc}")))
        orchestrator = free_port()
        try:
            for node in nodes:
                node.spawn()
            for node in nodes:
                node.wait_ready()
            env = {
                **os.environ,
                "TOKENRELAY_CONFIG": str(config),
                "TOKENRELAY_ORCHESTRATOR_LISTEN": f"127.0.0.1:{orchestrator}",
                "TOKENRELAY_ORCHESTRATOR_METRICS": "",
            }
            log = folder / "logs" / "orchestrator.log"
            process = _spawn(log, [sys.executable, "-m", "tokenrelay.orchestrator"], env)
            try:
                _wait_serving(f"127.0.0.1:{orchestrator}", 60)
                yield Cluster(dns, nodes, f"127.0.0.1:{orchestrator}", log)
            finally:
                Stack.kill_group(process)  # no test here watches the cluster stop
        finally:
            for node in nodes:
                node.kill()


def _wait_serving(address: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Status(pb.StatusRequest(), timeout=1).serving:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError("the orchestrator did not start serving")


def _request(max_tokens: int = 2) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model="synthetic", prompt="go", sampling=pb.SamplingParams(max_tokens=max_tokens)
    )


async def _served_by(
    stub: pb_grpc.GenerationServiceStub,
    max_tokens: int = 2,
    started: asyncio.Future[str] | None = None,
) -> tuple[str, str]:
    """The node that served one stream, and its finish reason; ``started`` is given the node
    as soon as the stream starts."""
    node, finish = "", ""
    async for message in stub.GenerateStream(_request(max_tokens), timeout=30):
        if message.HasField("start"):
            node = message.start.served_by.node
            if started is not None:
                started.set_result(node)
        if message.HasField("end"):
            finish = pb.FinishReason.Name(message.end.finish_reason)
    return node, finish


async def test_discovery_adds_new_nodes_and_drains_removed_ones(cluster: Cluster) -> None:
    first, second = (node.grpc for node in cluster.nodes)
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        assert {(await _served_by(stub))[0] for _ in range(4)} == {first}

        # Added: the second node takes traffic once the name resolves to it and a probe
        # found it ready.
        changed = time.monotonic()
        cluster.point(*HOSTS)
        seen: set[str] = set()
        while second not in seen:
            assert time.monotonic() - changed < 10, "the new node never took a request"
            seen.update([(await _served_by(stub))[0] for _ in range(4)])
        print(f"DNS change → traffic on the new node: {time.monotonic() - changed:.2f} s")

        # Removed: a long stream on the first node finishes; new requests go to the second.
        long = None
        for _ in range(20):
            started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(_served_by(stub, 150, started))  # ~3 s
            await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
            if started.done() and started.result() == first:
                long = task
                break
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert long is not None, "no stream landed on the first node"
        cluster.point(HOSTS[1])
        # Once the name is resolved again, the first node drains: it takes no new requests.
        assert await eventually(
            lambda: any(
                "node draining" in line and first in line
                for line in cluster.log.read_text().splitlines()
            ),
            timeout_s=10,
            step_s=0.05,
        ), "the first node was never drained"
        assert {(await _served_by(stub))[0] for _ in range(6)} == {second}
        status = await stub.Status(pb.StatusRequest(), timeout=5)
        assert first in {n.address for n in status.nodes}  # draining, its stream in flight
        node, finish = await long
        assert (node, finish) == (first, "FINISH_REASON_LENGTH")  # it finished

        async def forgotten() -> bool:  # drained, then forgotten
            status = await stub.Status(pb.StatusRequest(), timeout=5)
            return [n.address for n in status.nodes] == [second]

        assert await eventually(forgotten, timeout_s=10), "the drained node was never removed"
    log = cluster.log.read_text()
    assert "node added" in log and "node drained and removed" in log
