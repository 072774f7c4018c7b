"""Several processes of one service on one port: the supervisor, its coordinator, the workers.

With ``workers = N`` (> 1) a service's command becomes a **supervisor**. It reserves the
service's ports, starts a **coordinator** on a Unix socket, and runs N worker processes (the same
command, told ``--worker``), each listening on the same ports with ``SO_REUSEPORT``, so the kernel
spreads connections over them. It forwards SIGTERM/SIGINT to the workers, waits for them, and
starts again a worker that dies on its own.

**Ports.** ``reserve`` first binds a plain socket (``SO_REUSEADDR``, no ``SO_REUSEPORT``), which
fails when any process listens on the port, so a port taken by another orchestrator or edge (or
anything else) is refused, as a single process refuses it. It then keeps a socket bound there
with ``SO_REUSEPORT`` (never listening: it takes no connections) for the supervisor's lifetime:
the workers may join it, and another supervisor's plain bind fails.

**Limits that span workers** live in the coordinator, which holds the one ``AdmissionControl``
of an orchestrator (which the orchestrator builds and hands to its ``Supervisor``: this module
is below the services and imports none of them) and, when the tenancy's store is ``local``, the
one ``LocalLimits`` of a service's keys (requests per minute, concurrent streams, tokens; a Redis
store is shared by the workers as by replicas, and needs no coordinator). A worker asks over a
connection of its own per ask (``RemoteAdmission``, ``CoordinatorLimits``); a slot or a stream
lasts as long as that connection stays open: closing it (the request ended, or the worker died)
gives it back. The cost is a local connection per request (and per token ask of a metered key),
nothing per token.

**Metrics** stay per process and are labelled ``worker="i"``: each worker also serves its own
exposition on a Unix socket beside the coordinator's, and whichever worker is scraped gathers its
siblings' (``gather``), so one scrape of the service's port sees every worker. Sum over
``worker`` for the service's totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tokenrelay._accept import LISTEN_BACKLOG
from tokenrelay._exec import wrapped
from tokenrelay.config import Admission, join_hostport, split_hostport
from tokenrelay.errors import Overloaded
from tokenrelay.tenancy import (
    Identity,
    LocalLimits,
    Priority,
    StoreDown,
    StreamLease,
    TokenAsk,
    TokenGrant,
)

__all__ = [
    "Coordinator",
    "CoordinatorLimits",
    "GroupAdmission",
    "RemoteAdmission",
    "Supervisor",
    "WorkerContext",
    "gather",
    "reserve",
    "reserve_all",
    "serve_own_metrics",
    "worker_command",
]

log = logging.getLogger(__name__)


def reserve(host: str, port: int) -> socket.socket:
    """Refuse a taken port (``OSError``), then hold it for workers (see the module docstring).
    With ``port`` 0 a free port is chosen; the returned socket's name says which."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as check:
            check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            check.bind((host, port))
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise
    return holder


def reserve_all(addresses: Mapping[str, str], env: dict[str, str]) -> list[socket.socket]:
    """``reserve`` each of a service's ``host:port`` addresses (``""``: off, skipped), keyed by
    the environment variable that tells the workers where it is, and set that variable in
    ``env`` to the address held (port 0 becomes the chosen port). The holders are the caller's
    to close; on ``OSError`` those taken so far are closed first."""
    holders: list[socket.socket] = []
    try:
        for variable, address in addresses.items():
            if address:
                host, port = split_hostport(address)
                holders.append(reserve(host, port))
                env[variable] = join_hostport(host, int(holders[-1].getsockname()[1]))
    except OSError:
        for holder in holders:
            holder.close()
        raise
    return holders


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a worker knows of its group: its index, how many there are, and the directory of
    the coordinator's and the workers' sockets."""

    index: int
    count: int
    directory: Path

    @property
    def coordinator(self) -> Path:
        return self.directory / "coordinator.sock"

    def metrics_socket(self, index: int) -> Path:
        return self.directory / f"metrics-{index}.sock"

    def argv(self) -> list[str]:
        return ["--worker", str(self.index), str(self.count), str(self.directory)]

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> WorkerContext | None:
        """The context a supervisor passed (``--worker I N DIR``), or None."""
        if len(argv) >= 4 and argv[0] == "--worker":
            return cls(int(argv[1]), int(argv[2]), Path(argv[3]))
        return None


# --- the coordinator (in the supervisor) -----------------------------------------------------


def _identity_json(identity: Identity | None) -> dict[str, object] | None:
    if identity is None:
        return None
    fields = dataclasses.asdict(identity)
    fields["priority"] = int(identity.priority)
    return fields


def _identity(fields: object) -> Identity | None:
    if not isinstance(fields, dict):
        return None
    return Identity(**{**fields, "priority": Priority(int(fields["priority"]))})


def _ask_json(ask: TokenAsk) -> dict[str, object]:
    return dataclasses.asdict(ask)


class GroupAdmission(Protocol):
    """What the coordinator needs of the group's admission control: the orchestrator's
    ``AdmissionControl``, which the orchestrator builds (from ``[orchestrator.admission]``) and
    hands over, so that this module needs nothing of the orchestrator."""

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        ...

    def slot(
        self, budget_s: float | None = None, identity: Identity | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold one generation slot for the block; raises ``Overloaded`` when none comes in
        time (or the request is shed)."""
        ...


class Coordinator:
    """Serves the workers' asks on a Unix socket: ``slot`` (admission, the group's one
    ``AdmissionControl``), and ``request``, ``stream``, ``take_tokens``, ``give_back`` (the
    group's one ``LocalLimits``). A line of JSON asks, a line of JSON answers; a slot or a
    stream lasts until the asking connection closes. ``admission``: the group's admission
    control; without one (the edge's group) a ``slot`` ask is closed unanswered."""

    def __init__(self, path: Path, admission: GroupAdmission | None = None) -> None:
        self._path = path
        self._admission = admission
        self._limits = LocalLimits()
        self._server: asyncio.AbstractServer | None = None

    @property
    def queued(self) -> int:
        """Requests of every worker waiting for an admission slot."""
        return 0 if self._admission is None else self._admission.queued

    async def start(self) -> None:
        # Every ask is a connection: a burst of requests over the workers is a burst of
        # connections here, past asyncio's default backlog of 100 (connect then fails EAGAIN).
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self._path), backlog=LISTEN_BACKLOG
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._limits.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            ask = json.loads(line)
            kind = ask.get("ask")
            if kind == "slot" and self._admission is not None:
                await self._slot(ask, reader, writer)
            elif kind == "request":
                wait = await self._limits.take_request(str(ask["key"]), int(ask["per_minute"]))
                await _answer(writer, {"wait": wait})
            elif kind == "stream":
                await self._stream(ask, reader, writer)
            elif kind == "take_tokens":
                grant = await self._limits.take_tokens(TokenAsk(**ask["token_ask"]))
                await _answer(writer, dataclasses.asdict(grant))
            elif kind == "give_back":
                await self._limits.give_back_tokens(TokenAsk(**ask["token_ask"]))
                await _answer(writer, {"done": True})
        except (ConnectionError, ValueError, KeyError, TypeError) as exc:
            log.info("coordinator: a worker's ask failed", extra={"fields": {"error": str(exc)}})
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _slot(
        self, ask: dict[str, object], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The worker closing its connection while it waits is a caller gone: stop waiting.
        gone = asyncio.ensure_future(reader.read())
        acquire = asyncio.ensure_future(self._hold(ask, writer, gone))
        try:
            await asyncio.wait({gone, acquire}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (gone, acquire):
                future.cancel()
            await asyncio.gather(gone, acquire, return_exceptions=True)

    async def _hold(
        self, ask: dict[str, object], writer: asyncio.StreamWriter, gone: asyncio.Future[bytes]
    ) -> None:
        assert self._admission is not None
        budget = ask.get("budget_s")
        identity = _identity(ask.get("identity"))
        try:
            async with self._admission.slot(
                None if budget is None else float(str(budget)), identity
            ):
                await _answer(writer, {"granted": True})
                await gone  # held until the worker closes the connection
        except Overloaded as exc:
            await _answer(
                writer, {"granted": False, "message": exc.message, "retry_after": exc.retry_after}
            )

    async def _stream(
        self, ask: dict[str, object], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        lease = await self._limits.open_stream(str(ask["key"]), int(str(ask["limit"])))
        if lease is None:
            await _answer(writer, {"granted": False})
            return
        try:
            await _answer(writer, {"granted": True})
            await reader.read()  # held until the worker closes the connection
        finally:
            await lease.release()


async def _answer(writer: asyncio.StreamWriter, answer: dict[str, object]) -> None:
    writer.write(json.dumps(answer).encode() + b"\n")
    await writer.drain()


# --- the workers' side ------------------------------------------------------------------------


async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the coordinator; a full accept queue (EAGAIN: a Unix socket's connect
    does not wait for room) is tried again for up to about 0.1 s."""
    for delay in _CONNECT_RETRIES:
        try:
            return await asyncio.open_unix_connection(str(path))
        except BlockingIOError as exc:
            if exc.errno != errno.EAGAIN or delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


_CONNECT_RETRIES = (0.001, 0.004, 0.016, 0.064, None)


async def _ask(
    path: Path, ask: dict[str, object]
) -> tuple[dict[str, object], asyncio.StreamWriter]:
    reader, writer = await _connect(path)
    try:
        writer.write(json.dumps(ask).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise ConnectionError("the coordinator closed the connection")
        answer: dict[str, object] = json.loads(line)
    except BaseException:
        writer.close()
        raise
    return answer, writer


async def _let_go(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class RemoteAdmission:
    """``AdmissionControl``'s face for a worker: the slots are the coordinator's, shared by all
    workers; ``running`` and ``queued`` count this worker's requests."""

    def __init__(self, coordinator: Path, settings: Admission) -> None:
        self._coordinator = coordinator
        self._settings = settings
        self.running = 0
        self._queued: Counter[Priority] = Counter()

    @property
    def queued(self) -> int:
        return sum(self._queued.values())

    def queued_in(self, priority: Priority) -> int:
        return self._queued[priority]

    @asynccontextmanager
    async def slot(
        self, budget_s: float | None = None, identity: Identity | None = None
    ) -> AsyncIterator[None]:
        """As ``AdmissionControl.slot``; raises ``Overloaded`` as the coordinator says, and
        ``Overloaded`` too when the coordinator cannot be reached."""
        from tokenrelay.tracing import tracer

        priority = identity.priority if identity is not None else Priority.NORMAL
        self._queued[priority] += 1
        try:
            with tracer().start_as_current_span("tokenrelay.admission"):
                try:
                    answer, writer = await _ask(
                        self._coordinator,
                        {"ask": "slot", "budget_s": budget_s, "identity": _identity_json(identity)},
                    )
                except (OSError, ValueError) as exc:
                    log.error(
                        "admission coordinator unreachable",
                        extra={"fields": {"error": str(exc)}},
                    )
                    raise Overloaded(
                        "The service is not accepting work; retry later.",
                        self._settings.retry_after_s,
                    ) from None
        finally:
            self._queued[priority] -= 1
        try:
            if not answer.get("granted"):
                retry = answer.get("retry_after")
                raise Overloaded(
                    str(answer.get("message", "The service is at capacity; retry later.")),
                    float(str(retry)) if retry is not None else self._settings.retry_after_s,
                )
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
        finally:
            await _let_go(writer)


class _CoordinatorLease:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer: asyncio.StreamWriter | None = writer

    async def release(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await _let_go(writer)


class CoordinatorLimits:
    """A ``tokenrelay.tenancy.LimitStore`` for a worker: the counters are the coordinator's
    ``LocalLimits``, so a group of workers limits a key as one process does. Raises
    ``StoreDown`` when the coordinator cannot be reached (the tenancy's store-down policy
    applies as to a shared store)."""

    def __init__(self, coordinator: Path) -> None:
        self._coordinator = coordinator

    async def _once(self, ask: dict[str, object]) -> dict[str, object]:
        try:
            answer, writer = await _ask(self._coordinator, ask)
        except (OSError, ValueError) as exc:
            raise StoreDown(f"the workers' coordinator cannot be reached: {exc}") from exc
        await _let_go(writer)
        return answer

    async def take_request(self, key: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        answer = await self._once({"ask": "request", "key": key, "per_minute": per_minute})
        return float(str(answer.get("wait", 0.0)))

    async def open_stream(self, key: str, limit: int) -> StreamLease | None:
        try:
            answer, writer = await _ask(
                self._coordinator, {"ask": "stream", "key": key, "limit": limit}
            )
        except (OSError, ValueError) as exc:
            raise StoreDown(f"the workers' coordinator cannot be reached: {exc}") from exc
        if not answer.get("granted"):
            await _let_go(writer)
            return None
        return _CoordinatorLease(writer)

    async def take_tokens(self, ask: TokenAsk) -> TokenGrant:
        answer = await self._once({"ask": "take_tokens", "token_ask": _ask_json(ask)})
        return TokenGrant(**answer)  # type: ignore[arg-type]

    async def give_back_tokens(self, ask: TokenAsk) -> None:
        await self._once({"ask": "give_back", "token_ask": _ask_json(ask)})

    async def close(self) -> None:
        return None


# --- metrics across workers ----------------------------------------------------------------


async def serve_own_metrics(path: Path, registry: CollectorRegistry) -> asyncio.AbstractServer:
    """This worker's exposition, for its siblings (one answer per connection)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(generate_latest(registry))
            await writer.drain()
        finally:
            writer.close()

    # A worker started again finds its predecessor's socket file: replace it.
    await asyncio.to_thread(path.unlink, missing_ok=True)
    return await asyncio.start_unix_server(answer, path=str(path))


async def _fetch(path: Path) -> str:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        return (await reader.read()).decode()
    finally:
        writer.close()


class _Families:
    """Metric families to render with prometheus_client's own writer."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _labelled(texts: dict[int, str]) -> bytes:
    """Expositions of several workers as one, each sample labelled with its worker."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            for sample in family.samples:
                merged.samples.append(
                    sample._replace(labels={**sample.labels, "worker": str(index)})
                )
    return generate_latest(_Families(list(families.values())))


async def gather(context: WorkerContext, registry: CollectorRegistry) -> bytes:
    """The whole group's metrics, labelled by worker (a sibling that does not answer, e.g.
    while it restarts, is left out of this scrape)."""
    texts = {context.index: generate_latest(registry).decode()}
    others = [i for i in range(context.count) if i != context.index]
    fetched = await asyncio.gather(
        *(asyncio.wait_for(_fetch(context.metrics_socket(i)), 2.0) for i in others),
        return_exceptions=True,
    )
    for index, text in zip(others, fetched, strict=True):
        if isinstance(text, str):
            texts[index] = text
    # Parsing every worker's exposition takes ~65 ms per worker of 1.9k lines: not on the loop
    # that streams answers (it would stall them once a scrape).
    return await asyncio.to_thread(_labelled, texts)


# --- the supervisor ------------------------------------------------------------------------


class Supervisor:
    """Runs ``count`` copies of ``command`` (each given ``--worker I N DIR``) beside a
    coordinator, until SIGTERM/SIGINT. The caller reserves the ports first (``reserve``) and
    holds them while this runs. ``admission``: the group's one admission control, which the
    coordinator serves to the workers (the orchestrator's; None for the edge)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        count: int,
        env: dict[str, str] | None = None,
        admission: GroupAdmission | None = None,
        restart_delay_s: float = 1.0,
    ) -> None:
        self._name = name
        self._command = list(command)
        self._count = count
        self._env = dict(os.environ if env is None else env)
        self._admission = admission
        self._restart_delay_s = restart_delay_s

    async def run(self) -> int:
        """Serve until a signal; the exit code (0 once every worker stopped cleanly)."""
        with tempfile.TemporaryDirectory(prefix=f"tokenrelay-{self._name}-") as directory:
            coordinator = Coordinator(Path(directory) / "coordinator.sock", self._admission)
            await coordinator.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                return await self._supervise(Path(directory), stop)
            finally:
                await coordinator.close()

    async def _spawn(self, index: int, directory: Path) -> asyncio.subprocess.Process:
        context = WorkerContext(index, self._count, directory)
        # SIGTERM when the supervisor dies, however it dies: one killed with SIGKILL forwards
        # nothing, and its workers went on holding the port without their coordinator.
        command = wrapped([*self._command, *context.argv()], death_signal=signal.SIGTERM)
        return await asyncio.create_subprocess_exec(*command, env=self._env)

    async def _supervise(self, directory: Path, stop: asyncio.Event) -> int:
        """Restarts a worker that exits, after ``restart_delay_s`` doubled at each exit in a row
        that came within ``_STEADY_S`` of its start (at most ``_MOST_DELAY_S``); gives up (1)
        once every worker has failed so ``_GIVE_UP`` times in a row: nothing serves then, and
        whatever runs the service (systemd, Kubernetes) should see it."""
        loop = asyncio.get_running_loop()
        workers = {i: await self._spawn(i, directory) for i in range(self._count)}
        started = dict.fromkeys(workers, loop.time())
        failures: Counter[int] = Counter()  # exits in a row, each soon after its start
        restart_at: dict[int, float] = {}  # workers waiting for their restart
        log.info(
            f"{self._name} supervisor running {self._count} workers",
            extra={"fields": {"workers": [w.pid for w in workers.values()]}},
        )
        stopping = asyncio.ensure_future(stop.wait())
        gave_up = False
        try:
            while not stop.is_set():
                for index, when in list(restart_at.items()):
                    if when <= loop.time():
                        del restart_at[index]
                        workers[index] = await self._spawn(index, directory)
                        started[index] = loop.time()
                waits = {
                    asyncio.ensure_future(w.wait()): i
                    for i, w in workers.items()
                    if i not in restart_at
                }
                due = min(restart_at.values(), default=None)
                done, _ = await asyncio.wait(
                    {stopping, *waits},
                    timeout=None if due is None else max(due - loop.time(), 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for future in waits:
                    if future not in done:
                        future.cancel()
                if stop.is_set():
                    break
                for future in done:
                    index = waits[future]
                    quick = loop.time() - started[index] < _STEADY_S
                    failures[index] = failures[index] + 1 if quick else 1
                    delay = min(self._restart_delay_s * 2 ** (failures[index] - 1), _MOST_DELAY_S)
                    restart_at[index] = loop.time() + delay
                    log.error(
                        f"{self._name} worker exited; starting it again in {delay:g} s",
                        extra={"fields": {"worker": index, "code": future.result()}},
                    )
                if all(failures[i] >= _GIVE_UP for i in workers):
                    log.error(
                        f"{self._name} supervisor stopping: every worker keeps exiting at start",
                        extra={"fields": {"exits_in_a_row": _GIVE_UP}},
                    )
                    gave_up = True
                    break
        finally:
            stopping.cancel()
            for worker in workers.values():
                if worker.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.send_signal(signal.SIGTERM)
            # (a worker waiting for its restart exited already: its code was logged then)
            codes = [await w.wait() for i, w in workers.items() if i not in restart_at]
        log.info(f"{self._name} supervisor stopped", extra={"fields": {"codes": codes}})
        return 1 if gave_up or any(code != 0 for code in codes) else 0


# A worker's exit within this many seconds of its start counts towards the restart backoff and
# the supervisor's giving up; the most a restart waits; the exits in a row of every worker that
# make the supervisor give up.
_STEADY_S = 30.0
_MOST_DELAY_S = 30.0
_GIVE_UP = 5


def worker_command(module: str) -> list[str]:
    """The command that runs ``module`` again, for its workers."""
    return [sys.executable, "-m", module]
