"""A throwaway Redis for tests and benchmarks of the shared limits store: Debian's
``redis-server`` (``make test`` installs it) on a loopback port, nothing saved to disk.

``kill`` (SIGKILL) and ``start`` again on the same port are how the tests take the store away
and bring it back.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["Redis"]

_BINARY = "redis-server"


class Redis:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        binary = shutil.which(_BINARY) or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise FileNotFoundError("redis-server is not installed (make test installs it)")
        self.binary = binary
        self.host = host
        self.port = port
        self.home = Path(tempfile.mkdtemp(prefix="tokenrelay-redis-"))
        self.log = self.home / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout_s: float = 20.0) -> Redis:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--bind",
                    self.host,
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.home),
                    "--protected-mode",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ping():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def kill(self) -> None:
        """SIGKILL: the store gone without a word (its data with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Redis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
