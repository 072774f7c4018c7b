"""What the sections are made of: the pydantic configuration of their dataclasses and the field
types that carry their bounds, so that a field's check is written where the field is; and the
parsing of the values that name places (``host:port``, a ``dns:`` node entry), which the
settings check and the services use."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field

from tokenrelay._affinity import parse_cpus

# Unknown keys are errors (a typo never goes unnoticed); no coercion between types (a quoted
# number is not a number, a number is not a string); numbers are finite (TOML allows inf and nan,
# and neither makes a timeout or a share mean anything).
SECTION = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Seconds = Annotated[float, Field(gt=0)]
"""A duration that has to pass before something happens: > 0."""
SecondsOrOff = Annotated[float, Field(ge=0)]
"""A duration where 0 means at once, or turns the feature off (the field says which)."""
AtLeastOne = Annotated[int, Field(ge=1)]
AtLeastZero = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(gt=0, le=1)]
"""A fraction in (0, 1]."""
Name = Annotated[str, Field(min_length=1)]


def split_hostport(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; ``"[::1]:80"`` → ``("::1", 80)``.

    Raises ``ValueError`` when ``address`` is not ``host:port`` with a port in 0..65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def join_hostport(host: str, port: int) -> str:
    """``("::1", 80)`` → ``"[::1]:80"``; the inverse of ``split_hostport``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_DNS_SCHEME = "dns:"


@dataclass(frozen=True, slots=True)
class DnsName:
    """A node entry that names a DNS name: the entry as written, the DNS server to ask (None:
    the system's), the name and the nodes' port."""

    entry: str
    server: tuple[str, int] | None
    host: str
    port: int


def parse_dns(entry: str) -> DnsName | None:
    """The ``DnsName`` of a ``dns:`` entry, None for a plain ``host:port``; raises
    ``ValueError`` for a malformed ``dns:`` entry (``dns://[server[:port]]/host:port``)."""
    if not entry.startswith(_DNS_SCHEME):
        return None
    rest = entry[len(_DNS_SCHEME) :]
    if not rest.startswith("//"):
        raise ValueError(f"{entry!r}: expected dns:///host:port or dns://server/host:port")
    authority, slash, target = rest[2:].partition("/")
    host, colon, port = target.rpartition(":")
    if not slash or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r}: expected dns:///host:port or dns://server/host:port")
    server = None
    if authority:
        name, sep, server_port = authority.rpartition(":")
        if not sep:
            name, server_port = authority, "53"
        if not server_port.isdigit():
            raise ValueError(f"{entry!r}: the DNS server's port is not a number")
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            raise ValueError(f"{entry!r}: the DNS server must be an IP address") from None
        server = (name.strip("[]"), int(server_port))
    return DnsName(entry, server, host.strip("[]"), int(port))


def _host_port(value: str) -> str:
    split_hostport(value)
    return value


def _host_port_or_empty(value: str) -> str:
    return _host_port(value) if value else value


HostPort = Annotated[str, AfterValidator(_host_port)]
"""``host:port`` (IPv6 hosts in brackets); port 0 lets the system pick one."""
HostPortOrOff = Annotated[str, AfterValidator(_host_port_or_empty)]
"""``host:port``, or ``""`` for none."""


def _cpu_list(value: str) -> str:
    parse_cpus(value)
    return value


CpuList = Annotated[str, AfterValidator(_cpu_list)]
"""Core numbers and ranges (``"0-3,8"``), or ``""`` for none."""


def check_pair(names: tuple[str, str], cert: str, key: str) -> None:
    """A TLS certificate needs its key, and a key its certificate; raises ``ValueError``."""
    if bool(cert) != bool(key):
        raise ValueError(f"{names[0]} and {names[1]} go together: set both or neither")
