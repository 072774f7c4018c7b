"""The path of one streamed request through tokenrelay's own modules (``measure``): what
``scripts/request_path.py`` prints, the README's architecture section is written from, and
``tests/inprocess/test_architecture.py`` bounds.

Runs an orchestrator and an edge in this process over a fake token source (a word every 20 ms),
waits until the edge is ready, sends one streamed chat completion through the edge, and records
(with ``sys.setprofile``) every call into a ``tokenrelay`` module while it is served. Reports the
modules in the order they are first entered (logs, tracing, metrics, config, the loop's
heartbeat and the generated ``v1`` left out) and how many times control came into each from
another module while the request was being set up (until its first token reached the client)
— the measure of a hub — and then per token.
"""

from __future__ import annotations

import asyncio
import dis
import functools
import inspect
import sys
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

import tokenrelay
from _support.fakes import FakeSource
from tokenrelay.config import EdgeSettings, OrchestratorSettings, Settings
from tokenrelay.edge import create_app
from tokenrelay.orchestrator import Orchestrator

__all__ = ["RequestPath", "measure"]

_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_PACKAGE = str(Path(tokenrelay.__file__).resolve().parent) + "/"
# ... and the event loop's heartbeat (_probes), beaten every 50 ms whatever the requests.
_CROSS_CUTTING = (
    "logs.py",
    "tracing.py",
    "metrics.py",
    "_metrics.py",
    "config/",
    "config.py",
    "_probes.py",
)


def _module(frame: FrameType) -> str | None:
    path = frame.f_code.co_filename
    if not path.startswith(_PACKAGE) or "/v1/" in path:
        return None
    name = path[len(_PACKAGE) :]
    return None if name.endswith(_CROSS_CUTTING) or name.startswith("config/") else name


@functools.cache
def _start(code: CodeType) -> int:
    """Where a frame of ``code`` stands when it starts: its first ``RESUME``."""
    return next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")


class RequestPath:
    """Entries into each module, until the first token ("setup") and after it ("tokens"), of a
    stream of ``tokens`` tokens."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.order: list[str] = []
        self.entries: dict[str, Counter[str]] = {"setup": Counter(), "tokens": Counter()}
        self.phase = "setup"
        self.functions: dict[str, set[str]] = {}
        # (phase, module, function, calling module): for finding where a hop comes from.
        self.calls: Counter[tuple[str, str, str, str]] = Counter()

    def setup(self, module: str) -> int:
        """Times ``module`` was entered from another module until the first token."""
        return self.entries["setup"][module]

    def per_token(self, module: str) -> float:
        """Times ``module`` was entered from another module per token after the first."""
        return self.entries["tokens"][module] / self.tokens

    def lines(self) -> list[str]:
        """The report ``scripts/request_path.py`` prints."""
        out = [
            f"{len(self.order)} modules, in the order first entered; times entered from another",
            f"module until the first token, and per token after it ({self.tokens} tokens):",
        ]
        for module in self.order:
            ways = ", ".join(sorted(self.functions[module]))
            out.append(
                f"  {module:28s} {self.setup(module):3d} {self.per_token(module):5.1f}  {ways}"
            )
        return out

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = _module(frame)
        if module is None:
            return
        if frame.f_code.co_flags & _SUSPENDABLE and frame.f_lasti != _start(frame.f_code):
            # A generator or coroutine resumed, not a new call. (Not told by the frame's id:
            # a new frame often takes the id of one that is gone.)
            return
        caller = frame.f_back
        calling = None if caller is None else _module(caller)
        if calling == module:
            return  # a call inside the module
        if module not in self.order:
            self.order.append(module)
        self.entries[self.phase][module] += 1
        self.functions.setdefault(module, set()).add(frame.f_code.co_name)
        where = calling or (caller.f_code.co_filename if caller is not None else "-")
        self.calls[self.phase, module, frame.f_code.co_name, where] += 1


async def measure() -> RequestPath:
    """The path of one streamed chat completion (8 tokens), both services in this process."""
    source = FakeSource(words=tuple(f" w{i}" for i in range(8)), interval_s=0.02)
    # The node probe stays out of the way: it is not part of the request.
    settings = Settings(
        orchestrator=OrchestratorSettings(
            triton=(source.name,), metrics_listen="", probe_interval_s=3600
        )
    )
    orchestrator = Orchestrator(settings, sources={source.name: source})
    await orchestrator.start("127.0.0.1:0")
    app = create_app(EdgeSettings(orchestrator=f"127.0.0.1:{orchestrator.port}"))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    body = {
        "model": "synthetic",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    path = RequestPath(len(source.words))
    try:
        async with ClientSession() as session:
            # Not the request's: the edge's readiness watch and the nodes' first probe.
            while True:
                async with session.get(server.make_url("/readyz")) as ready:
                    if ready.status == 200:
                        break
                await asyncio.sleep(0.01)
            sys.setprofile(path)
            asyncio.get_running_loop().set_debug(False)
            async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
                while chunk := await r.content.readany():
                    if b'"content":"' in chunk and b'"content":""' not in chunk:
                        path.phase = "tokens"
            sys.setprofile(None)
    finally:
        sys.setprofile(None)
        await server.close()
        await orchestrator.stop(grace_s=0)
    return path
