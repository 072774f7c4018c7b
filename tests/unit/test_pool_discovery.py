"""Node discovery (``orchestrator/_discovery.py``) and the pool's groups: DNS entries parsed,
new members probed before use, removed members drained, failures changing nothing."""

from __future__ import annotations

import pytest

from _support import FakeSource
from tokenrelay.config import DnsName, parse_dns
from tokenrelay.orchestrator._discovery import Discovery
from tokenrelay.orchestrator._pool import NodePool, Outcome, Placement

GROUP = "dns:///triton.test:8001"


def test_dns_entries_are_parsed_as_grpc_names_them() -> None:
    assert parse_dns("10.0.0.1:8001") is None
    assert parse_dns(GROUP) == DnsName(GROUP, None, "triton.test", 8001)
    name = parse_dns("dns://127.0.0.1:5353/triton.test:8001")
    assert name is not None and name.server == ("127.0.0.1", 5353)
    name = parse_dns("dns://10.0.0.10/t:1")
    assert name is not None and name.server == ("10.0.0.10", 53)
    for bad in ("dns:triton:8001", "dns:///triton", "dns://resolver.example/t:1", "dns:///t:0"):
        with pytest.raises(ValueError):
            parse_dns(bad)


class Answers:
    """A resolver that answers what the test says (or fails with OSError)."""

    def __init__(self) -> None:
        self.addresses: set[str] | OSError = set()

    async def resolve(self, name: DnsName, timeout_s: float) -> set[str]:
        if isinstance(self.addresses, OSError):
            raise self.addresses
        return set(self.addresses)


async def test_discovered_nodes_are_probed_then_used_and_drained_when_gone() -> None:
    made: dict[str, FakeSource] = {}

    def make(address: str) -> FakeSource:
        made[address] = FakeSource(address, ready=address != "10.0.0.3:8001")
        return made[address]

    pool = NodePool({}, {"m": Placement("m", (GROUP,))})
    answers = Answers()
    discovery = Discovery(pool, [parse_dns(GROUP)], make, answers)  # type: ignore[list-item]
    assert not await discovery.resolve_once() and not pool.ready("m")
    answers.addresses = {"10.0.0.1:8001", "10.0.0.3:8001"}
    assert await discovery.resolve_once()
    assert pool.ready("m")
    lease = pool.pick("m")
    assert lease is not None and lease.node == "10.0.0.1:8001"  # .3 is not ready: never picked
    answers.addresses = {"10.0.0.2:8001"}
    await discovery.resolve_once()
    status = {s.node: s for s in pool.status()}
    assert status["10.0.0.1:8001"].draining and status["10.0.0.1:8001"].in_flight == 1
    assert "10.0.0.3:8001" not in status  # nothing in flight: forgotten at once
    assert {pool.pick("m").node for _ in range(5)} == {"10.0.0.2:8001"}  # type: ignore[union-attr]
    lease.release(Outcome.SUCCESS)  # the in-flight request finished
    assert await pool.reap() == ["10.0.0.1:8001"]
    assert made["10.0.0.1:8001"].closed and made["10.0.0.3:8001"].closed
    answers.addresses = OSError("no answer")
    assert not await discovery.resolve_once()  # a failed resolution keeps the nodes
    assert [s.node for s in pool.status()] == ["10.0.0.2:8001"]
    answers.addresses = set()  # an answer with no records: every node drains
    await discovery.resolve_once()
    assert not pool.ready("m")


@pytest.mark.parametrize("placement", ["static", "dns group"])
async def test_a_node_that_fails_its_probe_gives_up_its_requests_when_another_can_serve(
    placement: str,
) -> None:
    """Its requests are moved at once (the lease is lost), as with nodes named one by one."""
    if placement == "static":
        pool = NodePool(
            {"a:1": FakeSource("a:1"), "b:1": FakeSource("b:1")},
            {"m": Placement("m", ("a:1", "b:1"))},
        )
    else:
        pool = NodePool({}, {"m": Placement("m", ("triton.svc:8001",))})
        pool.set_members("triton.svc:8001", ["a:1", "b:1"], FakeSource)
    await pool.probe_once()
    lease = pool.pick("m", exclude={"b:1"})
    assert lease is not None and lease.node == "a:1"
    pool._sources["a:1"].is_ready = False  # type: ignore[attr-defined]  # a:1 stops answering
    await pool.probe_once()
    assert lease.lost
