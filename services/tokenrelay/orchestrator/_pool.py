"""The Triton nodes, what each can serve right now, and how busy each is.

A probe loop asks every node ServerReady and ModelReady for each model it should hold; a node
that fails a request with UNAVAILABLE is marked down at once instead of waiting for the next probe.
Among the ready nodes of a model, ``pick`` takes the one with the fewest requests in flight: Triton
exports no queue depth for LLM models, so the orchestrator's own counts are the load signal.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

from tokenrelay.generation import TokenSource

__all__ = ["NodePool"]

log = logging.getLogger(__name__)


class NodePool:
    def __init__(
        self,
        sources: Mapping[str, TokenSource],
        placement: Mapping[str, tuple[str, ...]],
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        """``placement`` maps each Triton model name to the nodes that should serve it.

        ``on_change(serving)`` is called whenever "at least one model can be served" flips.
        """
        self._sources = dict(sources)
        self._placement = dict(placement)
        self._ready: dict[tuple[str, str], bool] = {}
        self._in_flight: Counter[str] = Counter()
        self._on_change = on_change
        self._serving: bool | None = None

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    def ready(self, model: str) -> bool:
        return any(self._ready.get((node, model)) for node in self._placement.get(model, ()))

    async def _set(self, node: str, model: str, ready: bool) -> None:
        before = self._ready.get((node, model))
        self._ready[(node, model)] = ready
        if before != ready:
            log.info(
                "node readiness changed",
                extra={"fields": {"node": node, "triton_model": model, "ready": ready}},
            )
        serving = any(self._ready.values())
        if serving != self._serving:
            self._serving = serving
            if self._on_change is not None:
                await self._on_change(serving)

    async def probe_once(self) -> None:
        """Ask every node about every model it should serve, all at once."""
        pairs = [(node, model) for model, nodes in self._placement.items() for node in nodes]
        results = await asyncio.gather(*(self._sources[n].ready(m) for n, m in pairs))
        for (node, model), ready in zip(pairs, results, strict=True):
            await self._set(node, model, ready)

    async def run(self, interval_s: float) -> None:
        """Probe forever, every ``interval_s`` seconds; cancel the task to stop."""
        while True:
            await self.probe_once()
            await asyncio.sleep(interval_s)

    def pick(self, model: str) -> TokenSource | None:
        """The ready node of ``model`` with the fewest requests in flight, or None."""
        ready = [n for n in self._placement.get(model, ()) if self._ready.get((n, model))]
        if not ready:
            return None
        return self._sources[min(ready, key=lambda n: self._in_flight[n])]

    async def mark_down(self, node: str, model: str) -> None:
        """Take ``node`` out of rotation for ``model`` until a probe finds it ready again."""
        await self._set(node, model, False)

    @contextmanager
    def lease(self, node: str) -> Iterator[None]:
        """Count one request in flight on ``node`` for the duration of the block."""
        self._in_flight[node] += 1
        try:
            yield
        finally:
            self._in_flight[node] -= 1
