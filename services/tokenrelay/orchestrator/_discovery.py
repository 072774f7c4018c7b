"""Node discovery: a model's nodes named by DNS, as a Kubernetes headless Service names its pods.

A node entry ``dns:///triton-headless:8001`` (the system's resolver) or
``dns://10.0.0.10:53/triton-headless:8001`` (that DNS server; gRPC's naming) is a group whose
members are the name's A and AAAA records, each with the port (``tokenrelay.config.parse_dns``
reads an entry: the settings check entries with it). ``Discovery`` resolves every such
name every ``interval_s`` on the event loop (dnspython's async resolver) and hands the
addresses to the pool (``NodePool.set_members``): a new address gets a source and is probed
before it takes requests; an address that is gone is drained. A resolution that fails (timeout,
no server answers) changes nothing: only an answer — an empty one included, NXDOMAIN or no
records — says which nodes there are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from tokenrelay.config import DnsName
from tokenrelay.generation import TokenSource
from tokenrelay.orchestrator._pool import NodePool

__all__ = ["Discovery", "DnsResolver", "Resolver"]

log = logging.getLogger(__name__)


class Resolver(Protocol):
    """Turns a ``DnsName`` into ``host:port`` node addresses."""

    async def resolve(self, name: DnsName, timeout_s: float) -> set[str]:
        """The name's addresses now (an empty set when it has none); raises ``OSError`` when
        the resolution failed (no answer, a server failure)."""
        ...


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsResolver:
    """``Resolver`` with dnspython's asyncio resolver: A and AAAA records."""

    def __init__(self) -> None:
        self._resolvers: dict[tuple[str, int] | None, dns.asyncresolver.Resolver] = {}

    def _resolver(self, server: tuple[str, int] | None) -> dns.asyncresolver.Resolver:
        resolver = self._resolvers.get(server)
        if resolver is None:
            if server is None:
                resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf, once
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [server[0]]
                resolver.port = server[1]
            self._resolvers[server] = resolver
        return resolver

    async def resolve(self, name: DnsName, timeout_s: float) -> set[str]:
        resolver = self._resolver(name.server)
        found: set[str] = set()
        answered = False
        for kind in ("A", "AAAA"):
            try:
                # The system's search domains apply (a Kubernetes Service's short name).
                answer = await resolver.resolve(
                    name.host, kind, lifetime=timeout_s, search=name.server is None
                )
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                answered = True
                continue
            except dns.exception.DNSException as exc:
                if kind == "AAAA" and answered:
                    continue  # A answered; a server that fumbles AAAA says nothing more
                raise OSError(f"{name.host}: {type(exc).__name__}") from exc
            answered = True
            found.update(_address(record.to_text(), name.port) for record in answer)
        return found


class Discovery:
    """Keeps the pool's DNS-named groups equal to what DNS says (see the module docstring)."""

    def __init__(
        self,
        pool: NodePool,
        names: Iterable[DnsName],
        make_source: Callable[[str], TokenSource],
        resolver: Resolver | None = None,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
    ) -> None:
        self._pool = pool
        self._names = {n.entry: n for n in names}
        self._make = make_source
        self._resolver = resolver or DnsResolver()
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._failing: set[str] = set()

    async def resolve_once(self) -> bool:
        """Resolve every name once and update the pool; probes the new nodes at once (so they
        take requests without waiting for the probe loop). Whether anything changed."""
        results = await asyncio.gather(
            *(self._resolver.resolve(n, self._timeout_s) for n in self._names.values()),
            return_exceptions=True,
        )
        changed = False
        for name, result in zip(self._names.values(), results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, OSError):
                    raise result
                if name.entry not in self._failing:
                    log.warning(
                        "node discovery failed; keeping the nodes known so far",
                        extra={"fields": {"name": name.entry, "error": str(result)}},
                    )
                self._failing.add(name.entry)
                continue
            self._failing.discard(name.entry)
            added, removed = self._pool.set_members(name.entry, result, self._make)
            changed = changed or bool(added or removed)
        if changed:
            await self._pool.probe_once()
            await self._pool.reap()
        return changed

    async def run(self) -> None:
        """Resolve forever, every ``interval_s``; cancel the task to stop."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.resolve_once()
