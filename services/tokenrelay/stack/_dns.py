"""A throwaway DNS server for tests and benchmarks of node discovery: Debian's ``dnsmasq``
(``make test`` installs ``dnsmasq-base``) on a loopback port, answering from a hosts file that
``set`` rewrites (then SIGHUP: dnsmasq rereads it). Records have TTL 0, so every lookup sees
the latest file. It answers for names under ``domain`` (``.test`` by default, a name reserved
for testing) only: an unknown name there is NXDOMAIN, as a headless Service without pods."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["DnsServer"]


class DnsServer:
    def __init__(self, port: int, host: str = "127.0.0.1", domain: str = "test") -> None:
        self.domain = domain
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not Path(binary).exists():
            raise FileNotFoundError("dnsmasq is not installed (make test installs dnsmasq-base)")
        self.binary = binary
        self.host = host
        self.port = port
        self.home = Path(tempfile.mkdtemp(prefix="tokenrelay-dns-"))
        self.hosts = self.home / "hosts"
        self.log = self.home / "dnsmasq.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def authority(self) -> str:
        """What a ``dns://authority/name:port`` node entry names to ask this server."""
        return f"{self.host}:{self.port}"

    def set(self, records: Mapping[str, Sequence[str]]) -> None:
        """Name → addresses, all of them at once; the server answers with them from now on."""
        lines = [f"{a} {name}" for name, addresses in records.items() for a in addresses]
        staged = self.hosts.with_suffix(".new")
        staged.write_text("\n".join(lines) + "\n")
        staged.replace(self.hosts)
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def start(self, timeout_s: float = 10.0) -> DnsServer:
        if not self.hosts.exists():
            self.hosts.write_text("")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    f"--local=/{self.domain}/",
                    f"--addn-hosts={self.hosts}",
                    f"--listen-address={self.host}",
                    "--bind-interfaces",
                    f"--port={self.port}",
                    f"--pid-file={self.home / 'dnsmasq.pid'}",
                    "--user=root",
                    "--local-ttl=0",
                    "--log-facility=-",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dnsmasq exited:\n{self.log.read_text()[-2000:]}")
            if "started" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.05)
        raise TimeoutError("dnsmasq did not start")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
