"""Start and stop the whole local stack: tritonserver(s), the orchestrator and the edge.

The same code serves ``make run`` (``tokenrelay-stack``) and the system tests. Each component is
a real process on loopback with its log in ``<workdir>/logs/``; ``start()`` returns when the edge
says it is ready (which needs the orchestrator serving and Triton's models ready) and raises with
the tail of the failing component's log otherwise. ``stop()`` sends SIGTERM edge → orchestrator →
Triton and waits for each for a bounded time — its configured drain grace (Triton: its exit
timeout) plus a margin — then SIGKILLs its whole process group (Triton's Python-backend stubs are
in it). Every component gets a signal from the kernel if the launcher itself dies
(``PR_SET_PDEATHSIG``), so none outlives it, not even when the launcher is killed: SIGKILL, but
Triton SIGTERM, so that it removes its shared memory (bounded by its exit timeout). With
``fast_stop`` (test stacks whose stop no test watches), ``stop()`` SIGKILLs every process group
at once instead: a drain costs a stack seconds, and Triton's exit alone 2-3 s even when idle.
A Triton that did not remove its Python-backend shared-memory regions itself (killed, or past its
exit timeout) has them removed once it is gone.

With ``nodes=N`` there are N Triton servers (``TritonProcess``), each listed as an endpoint of
the orchestrator; the chaos tests kill, pause and restart them one by one.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tokenrelay._exec import wrapped
from tokenrelay.stack._triton import TritonPorts, prepare_backends, triton_command, triton_env

__all__ = ["Stack", "StackError", "StackPorts", "TritonProcess", "free_port"]

HOST = "127.0.0.1"
# Triton's own bound on unloading its models at exit (triton_command's --exit-timeout-secs).
TRITON_EXIT_S = 10.0
# What a component gets beyond its own bound before its process group is killed.
_STOP_MARGIN_S = 5.0
_SHM = Path("/dev/shm")
_SHM_OPTION = "shm-region-prefix-name="


class StackError(RuntimeError):
    """A component did not start; the message holds the tail of its log."""


def free_port() -> int:
    """A loopback port free now, and not one this process handed out before. It is chosen below
    the kernel's ephemeral range: the local ports of outgoing connections come from that range,
    so one chosen there could be taken by any connection (a client's, a probe's) before its
    service binds it ("Address already in use", seen once in a test run)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = _PORTS.randrange(_LOWEST_PORT, low) if low > _LOWEST_PORT + 1000 else 0
        if port in _HANDED:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _HANDED.add(port)
        return port
    raise OSError("no free port found below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_LOWEST_PORT = 15000
_PORTS = random.Random()
_HANDED: set[int] = set()


@dataclass(frozen=True, slots=True)
class StackPorts:
    edge: int = 8080
    orchestrator: int = 50051
    triton: TritonPorts = field(default_factory=TritonPorts)
    orchestrator_metrics: int = 9464
    orchestrator_frames: int = 50052
    """The edge's generations go to the orchestrator as frames here (``tokenrelay._frames``);
    0: over gRPC."""

    @classmethod
    def free(cls) -> StackPorts:
        triton = TritonPorts(free_port(), free_port(), free_port())
        return cls(free_port(), free_port(), triton, free_port(), free_port())


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return 0


def _spawn(
    log_path: Path,
    command: list[str],
    env: dict[str, str],
    death_signal: signal.Signals = signal.SIGKILL,
) -> subprocess.Popen[bytes]:
    """``death_signal``: what the child gets when the launcher dies (Triton: SIGTERM, so that it
    removes its shared memory on the way out, as a killed one cannot)."""
    # The child keeps its own copy of the descriptor; ours closes at once.
    with log_path.open("ab") as log:
        # A session of its own: Ctrl-C in the terminal reaches the launcher, which stops the
        # components in order, instead of all of them at once. Triton's Python-backend stubs
        # share their server's process group, so signalling the group reaches them too (and
        # they exit by themselves when their server is gone).
        return subprocess.Popen(
            wrapped(command, death_signal=death_signal),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(
    name: str,
    process: subprocess.Popen[bytes],
    url: str,
    log: Path,
    timeout_s: float,
    behind: Sequence[tuple[str, subprocess.Popen[bytes], Path]] = (),
) -> None:
    """Until ``url`` answers 200. ``behind``: the processes its readiness waits on (the
    edge's orchestrator): one that exits fails the wait at once, and their logs' tails join
    the error when it times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for each, running, its_log in ((name, process, log), *behind):
            if running.poll() is not None:
                raise StackError(f"{each} exited with {running.returncode}:\n{_log_tail(its_log)}")
        if _get(url) == 200:
            return
        time.sleep(0.05)
    tails = "".join(f"\n--- {each}:\n{_log_tail(its_log)}" for each, _, its_log in behind)
    raise StackError(f"{name} not ready after {timeout_s:g} s:\n{_log_tail(log)}{tails}")


def _signal_group(process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)


_GROUP_GONE_S = 5.0


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no live process is left in group ``pgid`` (killed: it is a matter of ms)."""
    deadline = time.monotonic() + timeout_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _remove_shared_memory(process: subprocess.Popen[bytes] | None) -> None:
    """Unlink the shared-memory regions of a tritonserver that has exited (its Python backend
    names them by ``shm-region-prefix-name``). Triton removes them on a clean exit; killed, or
    past its exit timeout, it leaves them in /dev/shm (RAM) for as long as the machine runs."""
    if process is None or process.poll() is None or not isinstance(process.args, list | tuple):
        return
    for arg in process.args:
        _, found, prefix = str(arg).partition(_SHM_OPTION)
        if found and prefix:
            for region in _SHM.glob(f"{prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()


class TritonProcess:
    """One ``tritonserver`` on loopback, which can be started again on the same ports.
    ``host``: another loopback address (127.0.0.2 …) lets several servers share one port, as
    the pods behind one DNS name do."""

    def __init__(
        self,
        name: str,
        model_repository: Path,
        ports: TritonPorts,
        models: tuple[str, ...],
        workdir: Path,
        extra_args: Sequence[str] = (),
        host: str = HOST,
    ) -> None:
        self.name = name
        self.host = host
        self.extra_args = tuple(extra_args)
        self.model_repository = model_repository.resolve()
        self.ports = ports
        self.models = models
        self.workdir = workdir
        self.log = workdir / "logs" / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def ready_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}/v2/health/ready"

    def spawn(self) -> None:
        backends = prepare_backends(self.workdir)
        command = triton_command(
            self.model_repository, backends, self.ports, self.models, self.host
        )
        command.extend(self.extra_args)
        self.process = _spawn(self.log, command, triton_env(), signal.SIGTERM)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        assert self.process is not None
        _wait_ready(self.name, self.process, self.ready_url, self.log, timeout_s)

    def start(self, timeout_s: float = 120.0) -> None:
        self.spawn()
        self.wait_ready(timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and its model stubs: a node that dies without a word."""
        Stack.kill_group(self.process)
        _remove_shared_memory(self.process)

    def pause(self) -> None:
        """SIGSTOP: a node that hangs with its connections open."""
        _signal_group(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.process, signal.SIGCONT)

    def request_stop(self) -> None:
        """SIGTERM without waiting (``stop`` waits), so that several servers stop together."""
        self.resume()  # a stopped process cannot handle SIGTERM
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL of the process group past Triton's exit timeout and a margin."""
        self.request_stop()
        code = Stack.terminate(self.process, TRITON_EXIT_S + _STOP_MARGIN_S)
        _remove_shared_memory(self.process)
        return code


def _graces(config: Path | None, env: Mapping[str, str]) -> tuple[float, float]:
    """The edge's and the orchestrator's drain grace, as the services will read them."""
    from tokenrelay.config import load_settings

    environ = {**os.environ, **env}
    if config is not None:
        environ["TOKENRELAY_CONFIG"] = str(config)
    try:
        settings = load_settings(environ)
    except (OSError, ValueError):  # the services will say what is wrong; bound by the defaults
        from tokenrelay.config import Settings

        settings = Settings()
    return settings.edge.drain_grace_s, settings.orchestrator.drain_grace_s


class Stack:
    def __init__(
        self,
        model_repository: Path,
        ports: StackPorts | None = None,
        models: tuple[str, ...] = (),
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        nodes: int = 1,
        node_repositories: Sequence[Path] = (),
        triton_args: Sequence[str] = (),
        node_factory: Callable[..., TritonProcess] | None = None,
        fast_stop: bool = False,
    ) -> None:
        """``models``: Triton models to load (default: all in the repository). ``config``: the
        TOML file for orchestrator and edge. ``env``: extra environment for both. ``nodes``:
        how many Triton servers; node i serves ``node_repositories[i]`` if given, else
        ``model_repository``. ``triton_args``: extra tritonserver options (e.g. TLS).
        ``node_factory``: what makes each node, ``TritonProcess``'s arguments in (the GPU path
        passes ``GpuTritonProcess``). ``fast_stop``: ``stop()`` kills everything at once (see
        the module docstring). Ports are known from here on, so a test can write
        ``config`` (naming ``triton_addresses``) before ``start()``."""
        self.fast_stop = fast_stop
        self.ports = ports or StackPorts()
        self.model_repository = model_repository.resolve()
        self.models = models
        self.config = config
        self.extra_env = dict(env or {})
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-")) if workdir is None else workdir
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        factory = node_factory or TritonProcess
        self.nodes = [
            factory(
                "triton" if i == 0 else f"triton-{i}",
                node_repositories[i] if i < len(node_repositories) else model_repository,
                self.ports.triton if i == 0 else TritonPorts(free_port(), free_port(), free_port()),
                models,
                self.workdir,
                triton_args,
            )
            for i in range(nodes)
        ]
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.edge: subprocess.Popen[bytes] | None = None
        self._graces = _graces(config, self.extra_env)

    @property
    def triton(self) -> subprocess.Popen[bytes] | None:
        """The first Triton server's process."""
        return self.nodes[0].process

    @property
    def triton_addresses(self) -> list[str]:
        return [node.grpc for node in self.nodes]

    @property
    def edge_url(self) -> str:
        return f"http://{HOST}:{self.ports.edge}"

    @property
    def orchestrator_address(self) -> str:
        return f"{HOST}:{self.ports.orchestrator}"

    @property
    def orchestrator_metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports.orchestrator_metrics}/metrics"

    @property
    def triton_grpc(self) -> str:
        return self.nodes[0].grpc

    @property
    def triton_metrics_url(self) -> str:
        return self.nodes[0].metrics_url

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return _spawn(self.logs / f"{name}.log", command, env)

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "TOKENRELAY_ORCHESTRATOR_LISTEN": self.orchestrator_address,
                "TOKENRELAY_ORCHESTRATOR_METRICS": f"{HOST}:{self.ports.orchestrator_metrics}",
                "TOKENRELAY_TRITON": ",".join(self.triton_addresses),
                "TOKENRELAY_EDGE_LISTEN": f"{HOST}:{self.ports.edge}",
                "TOKENRELAY_EDGE_ORCHESTRATOR": self.orchestrator_address,
            }
        )
        if self.ports.orchestrator_frames:
            frames = f"{HOST}:{self.ports.orchestrator_frames}"
            env["TOKENRELAY_ORCHESTRATOR_FRAMES"] = env["TOKENRELAY_EDGE_ORCHESTRATOR_FRAMES"] = (
                frames
            )
        if self.config is not None:
            env["TOKENRELAY_CONFIG"] = str(self.config)
        # Qdrant's embedded data lives with the stack (one process per directory).
        env.setdefault("TOKENRELAY_QDRANT_PATH", str(self.workdir / "qdrant"))
        env.update(self.extra_env)
        return env

    def log_tail(self, name: str, lines: int = 30) -> str:
        return _log_tail(self.logs / f"{name}.log", lines)

    def _wait(
        self, name: str, process: subprocess.Popen[bytes], url: str, timeout_s: float
    ) -> None:
        behind = (
            ()
            if self.orchestrator is None or name == "orchestrator"
            else (("orchestrator", self.orchestrator, self.logs / "orchestrator.log"),)
        )
        _wait_ready(name, process, url, self.logs / f"{name}.log", timeout_s, behind)

    def start_triton(self, timeout_s: float = 120.0) -> None:
        """Start every Triton node at once; return when all are ready."""
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready(timeout_s)

    def start(self, timeout_s: float = 180.0) -> Stack:
        """Start all three and wait until the edge is ready. Raises ``StackError``."""
        try:
            self.start_triton(timeout_s)
            env = self._service_env()
            python = sys.executable
            self.orchestrator = self._spawn(
                "orchestrator", [python, "-m", "tokenrelay.orchestrator"], env
            )
            self.edge = self._spawn("edge", [python, "-m", "tokenrelay.edge"], env)
            self._wait("edge", self.edge, f"{self.edge_url}/readyz", timeout_s)
            if self.orchestrator.poll() is not None:
                raise StackError(f"orchestrator exited:\n{self.log_tail('orchestrator')}")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def terminate(process: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL the process group; the exit code."""
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Triton's Python-backend stubs share its process group: make sure none is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    @staticmethod
    def kill_group(process: subprocess.Popen[bytes] | None) -> int | None:
        """SIGKILL the process group at once, no drain; the exit code, once the leader and (for
        up to ``_GROUP_GONE_S``) every other member are gone: a Triton's model stubs take a
        moment to die after the signal, and a caller may count on them being gone."""
        if process is None:
            return None
        if process.returncode is not None:  # reaped before: its pid may be someone else's now
            return process.returncode
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
        code = process.wait()
        _wait_group_gone(process.pid, _GROUP_GONE_S)
        return code

    def stop(self) -> None:
        """Stop everything that runs, edge first, each within its bound — or, with
        ``fast_stop``, kill all at once (see the module docstring). Safe to call more than once."""
        if self.fast_stop:
            for process in (self.edge, self.orchestrator, *(n.process for n in self.nodes)):
                if process is not None and process.poll() is None:
                    _signal_group(process, signal.SIGKILL)  # all at once, then reap each
            self.kill_group(self.edge)
            self.kill_group(self.orchestrator)
            for node in self.nodes:
                node.kill()
        else:
            edge_s, orchestrator_s = self._graces
            self.terminate(self.edge, edge_s + _STOP_MARGIN_S)
            self.terminate(self.orchestrator, orchestrator_s + _STOP_MARGIN_S)
            for node in self.nodes:
                node.request_stop()  # each takes seconds to unload its models: all at once
            for node in self.nodes:
                node.stop()
        if self._own_workdir and not os.environ.get("TOKENRELAY_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
