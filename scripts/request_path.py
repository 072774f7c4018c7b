"""Print the path of one streamed request through tokenrelay's own modules (the README's
architecture section is written from it).

    .venv/bin/python scripts/request_path.py

Runs an orchestrator and an edge in this process over a fake token source (a word every 20 ms),
waits until the edge is ready, sends one streamed chat completion through the edge, and records
(with ``sys.setprofile``) every call into a ``tokenrelay`` module while it is served. Prints the
modules in the order they are first entered (logs, tracing, metrics, config and the generated
``v1`` left out) and how many times control came into each from another module while the
request was being set up (until its first token reached the client) — the measure of a hub —
and then per token.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "services"), str(ROOT / "tests")]

from aiohttp import ClientSession  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from _support import FakeSource  # noqa: E402
from tokenrelay.config import EdgeSettings, OrchestratorSettings, Settings  # noqa: E402
from tokenrelay.edge import create_app  # noqa: E402
from tokenrelay.orchestrator import Orchestrator  # noqa: E402

_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_PACKAGE = str(ROOT / "services" / "tokenrelay") + "/"
_CROSS_CUTTING = ("logs.py", "tracing.py", "metrics.py", "_metrics.py", "config/", "config.py")


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


class _Path:
    """Entries into each module, until the first token ("setup") and after it ("tokens")."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.entries: dict[str, Counter[str]] = {"setup": Counter(), "tokens": Counter()}
        self.phase = "setup"
        self.functions: dict[str, set[str]] = {}

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
        if caller is not None and _module(caller) == module:
            return  # a call inside the module
        if module not in self.order:
            self.order.append(module)
        self.entries[self.phase][module] += 1
        self.functions.setdefault(module, set()).add(frame.f_code.co_name)


async def main() -> None:
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
    path = _Path()
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
        await server.close()
        await orchestrator.stop(grace_s=0)
    tokens = len(source.words)
    print(f"{len(path.order)} modules, in the order first entered; times entered from another")
    print(f"module until the first token, and per token after it ({tokens} tokens):")
    for module in path.order:
        setup, after = path.entries["setup"][module], path.entries["tokens"][module]
        ways = ", ".join(sorted(path.functions[module]))
        print(f"  {module:28s} {setup:3d} {after / tokens:5.1f}  {ways}")


if __name__ == "__main__":
    asyncio.run(main())
