"""The Triton nodes: which can serve each model now, how busy each is, and which takes a request.

A node serves a catalog model when its last probe said so (ServerReady and ModelReady) and its
circuit breaker lets requests through. A probe loop asks every node about every Triton model it
should hold; a node that answers for none of them has its breaker tripped, and a request that
finds a node unreachable takes it out of rotation at once instead of waiting for the next probe.

A probe that fails (no answer within the connect timeout: a hung node; or the model not ready)
also tells every request leased on that node and model (``Lease.lost``), when another node can
serve that model: a request still waiting for its first token is retried elsewhere at once, a
streaming one continued elsewhere, instead of each waiting for its own watchdog (the first-token
one is a minute by default). With nowhere else to go they stay, under their watchdogs: a probe
that timed out on a node that was only slow must not fail requests that node would still serve.

Routing is by least outstanding work with the power of two choices: two eligible nodes drawn at
random, the one with fewer requests in flight wins (among two or fewer, the least busy). Triton
exports no queue depth for LLM models, so the orchestrator's own counts are the load signal.
Optionally, prompts sharing a prefix go to the same node (rendezvous hashing), to reuse its
prefix cache, unless that node is busier than the least busy one by more than a set slack.

A placement may name a *group* instead of a node (a DNS name, ``_discovery.py``): the group's
members are set with ``set_members``. A new member is not leased until a probe finds it ready; a
member that leaves is drained — it takes no new requests, its requests in flight finish — and is
forgotten (its connection closed) once none is left (``reap``).

Each node has a three-state circuit breaker (``CircuitBreaker``).

CLOSED lets every request through and watches how they end: ``failure_threshold`` consecutive
failures, or a failure share of at least ``failure_rate`` among the requests that ended in the
last ``window_s`` (once there are ``min_requests`` of them), open it. OPEN lets nothing through
for ``cooldown_s``; then it is HALF_OPEN and lets up to ``half_open_probes`` requests through at
once as trials. A trial that succeeds closes it; one that fails opens it again for another
cool-down. ``trip()`` opens it at once (the node is unreachable, its readiness probe failed).

Requests admitted while CLOSED that end after the state changed do not decide anything: only
trials move a HALF_OPEN breaker. A request that ends neither well nor badly (the caller went
away, a hedged twin won, the request itself was invalid) is ``NEUTRAL`` and just gives its trial
slot back. The clock is injected so that every transition is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

from tokenrelay.config import Breaker
from tokenrelay.generation import TokenSource

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Lease",
    "NodePool",
    "NodeStatus",
    "Outcome",
    "Permit",
    "Placement",
]

log = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class Permit:
    """A request let through; hand it back to ``record`` exactly once."""

    trial: bool
    epoch: int  # the breaker's state changes so far, when the permit was given


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: Breaker,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (ended at, failed)
        self._opened_at = 0.0
        self._trials = 0
        self.transitions = 0

    @property
    def state(self) -> BreakerState:
        """The state now (an OPEN breaker whose cool-down has passed reads HALF_OPEN)."""
        self._refresh()
        return self._state

    def available(self) -> bool:
        """Whether ``acquire`` would let a request through now."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and self._trials < self._settings.half_open_probes
        )

    def acquire(self) -> Permit | None:
        """Let one request through, or None."""
        if not self.available():
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._trials += 1
            return Permit(trial=True, epoch=self.transitions)
        return Permit(trial=False, epoch=self.transitions)

    def record(self, permit: Permit, outcome: Outcome) -> None:
        """How the request let through with ``permit`` ended."""
        current = permit.epoch == self.transitions  # given in the state the breaker is in
        if permit.trial:
            if not current:
                return
            self._trials -= 1
            if outcome is not Outcome.NEUTRAL:
                if outcome is Outcome.SUCCESS:
                    self._reset()
                    self._move(BreakerState.CLOSED)
                else:
                    self._open()
            return
        if not current or outcome is Outcome.NEUTRAL:
            return
        now = self._clock()
        failed = outcome is Outcome.FAILURE
        self._window.append((now, failed))
        self._age_out(now)  # a node that never fails would keep every request's outcome
        self._consecutive = self._consecutive + 1 if failed else 0
        if failed and (self._consecutive >= self._settings.failure_threshold or self._rate_high()):
            self._open()

    def trip(self) -> None:
        """Open now (or restart the cool-down of an open breaker)."""
        self._open()

    def _age_out(self, now: float) -> None:
        horizon = now - self._settings.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _rate_high(self) -> bool:
        """Over the window's outcomes (``record`` has just aged it out)."""
        if len(self._window) < self._settings.min_requests:
            return False
        failures = sum(1 for _, failed in self._window if failed)
        return failures / len(self._window) >= self._settings.failure_rate

    def _refresh(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._settings.cooldown_s
        ):
            self._move(BreakerState.HALF_OPEN)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._reset()
        self._move(BreakerState.OPEN)

    def _reset(self) -> None:
        self._consecutive = 0
        self._window.clear()

    def _move(self, state: BreakerState) -> None:
        before = self._state
        if before is state:
            return
        self._state = state
        self.transitions += 1
        if state is not BreakerState.HALF_OPEN:
            self._trials = 0
        log.warning(
            "circuit breaker changed",
            extra={"fields": {"node": self.name, "from": before.value, "to": state.value}},
        )
        if self._on_change is not None:
            self._on_change(self.name, before, state)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a catalog model runs: its Triton model name on these nodes."""

    triton_model: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node: str
    breaker: BreakerState
    in_flight: int
    ready_models: tuple[str, ...]
    draining: bool = False


class Lease:
    """One request on one node: counted in flight until ``release``, which also tells the
    node's breaker how it ended. Releasing twice does nothing."""

    __slots__ = (
        "_permit",
        "_pool",
        "_released",
        "lost",
        "node",
        "on_lost",
        "source",
        "triton_model",
    )

    def __init__(
        self, pool: NodePool, source: TokenSource, triton_model: str, permit: Permit
    ) -> None:
        self._pool = pool
        self.source = source
        self.node = source.name  # the node's name (its address)
        self.triton_model = triton_model
        self._permit = permit
        self._released = False
        self.lost = False
        """Set when a probe found the node unable to serve the model while this lease held it."""
        self.on_lost: Callable[[], None] | None = None
        """Called once, when ``lost`` is set (by the request on the node, to stop waiting)."""
        pool._leases.setdefault((self.node, triton_model), set()).add(self)

    def lose(self) -> None:
        """The node failed its probe: mark the lease lost and tell its holder (once)."""
        if self.lost or self._released:
            return
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()

    def release(self, outcome: Outcome, node_down: bool = False) -> None:
        """End the lease. ``node_down``: the node could not be reached (or lost the model), so it
        leaves the rotation until a probe finds it ready again."""
        if self._released:
            return
        self._released = True
        self._pool._leases[(self.node, self.triton_model)].discard(self)
        self._pool._in_flight[self.node] -= 1
        self._pool._breakers[self.node].record(self._permit, outcome)
        if node_down:
            self._pool._ready[(self.node, self.triton_model)] = False
            log.warning(
                "node taken out of rotation",
                extra={"fields": {"node": self.node, "triton_model": self.triton_model}},
            )


class NodePool:
    def __init__(
        self,
        sources: Mapping[str, TokenSource],
        placement: Mapping[str, Placement],
        breaker: Breaker | None = None,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        affinity_slack: int = 4,
        auxiliary: Mapping[str, Placement] | None = None,
    ) -> None:
        """``placement`` maps each catalog model id to where it runs. ``auxiliary`` models (the
        embedding model) are probed and reported by ``ready`` too, but are neither leased nor
        counted for ``serving``.

        ``on_change(serving)`` is called (after a probe) whenever "at least one model can be
        served" flips.
        """
        self._sources = dict(sources)
        self._placement = dict(placement)
        self._auxiliary = dict(auxiliary or {})
        self._ready: dict[tuple[str, str], bool] = {}
        self._in_flight: Counter[str] = Counter()
        self._leases: dict[tuple[str, str], set[Lease]] = {}  # (node, triton model) → held
        self._breakers = {
            name: CircuitBreaker(name, breaker or Breaker(), clock) for name in self._sources
        }
        self._on_change = on_change
        self._serving: bool | None = None
        self._rng = rng or random.Random()
        self._slack = affinity_slack
        self._breaker_settings = breaker or Breaker()
        self._clock = clock
        self._members: dict[str, tuple[str, ...]] = {}  # group -> its nodes now
        self._draining: set[str] = set()

    def _nodes(self, where: Placement) -> list[str]:
        """``where``'s nodes now: its own, and each group's current members."""
        nodes: list[str] = []
        for name in where.nodes:
            for node in self._members.get(name, (name,)):
                if node not in nodes and node in self._sources and node not in self._draining:
                    nodes.append(node)
        return nodes

    def set_members(
        self, group: str, nodes: Collection[str], make: Callable[[str], TokenSource]
    ) -> tuple[list[str], list[str]]:
        """``group``'s members are now ``nodes`` (``make`` builds the source of a new one).
        Returns (added, removed); the added are not leased until a probe finds them ready, the
        removed are drained (see the module docstring)."""
        before = set(self._members.get(group, ()))
        now = set(nodes)
        self._members[group] = tuple(sorted(now))
        elsewhere = {n for g, members in self._members.items() if g != group for n in members}
        added = sorted(now - before)
        for node in added:
            self._draining.discard(node)
            if node not in self._sources:
                self._sources[node] = make(node)
                self._breakers[node] = CircuitBreaker(node, self._breaker_settings, self._clock)
        removed = sorted(before - now - elsewhere)
        self._draining.update(removed)
        for node in added:
            log.info("node added", extra={"fields": {"node": node, "group": group}})
        for node in removed:
            log.info(
                "node draining",
                extra={
                    "fields": {"node": node, "group": group, "in_flight": self._in_flight[node]}
                },
            )
        return added, removed

    async def close(self) -> None:
        """Close every node's source (configured and discovered). Safe to call more than once."""
        for source in list(self._sources.values()):
            await source.close()

    async def reap(self) -> list[str]:
        """Forget the drained nodes with nothing left in flight, closing their sources; their
        names."""
        gone = [n for n in sorted(self._draining) if not self._in_flight[n]]
        for node in gone:
            self._draining.discard(node)
            source = self._sources.pop(node)
            self._breakers.pop(node, None)
            self._in_flight.pop(node, None)
            for pair in [p for p in self._ready if p[0] == node]:
                del self._ready[pair]
            log.info("node drained and removed", extra={"fields": {"node": node}})
            await source.close()
        return gone

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    def _eligible(self, node: str, triton_model: str) -> bool:
        return bool(self._ready.get((node, triton_model))) and self._breakers[node].available()

    def ready(self, model: str) -> bool:
        """Whether some node can take a request for ``model`` now."""
        where = self._placement.get(model) or self._auxiliary.get(model)
        return where is not None and any(
            self._eligible(n, where.triton_model) for n in self._nodes(where)
        )

    def in_flight(self, node: str) -> int:
        return self._in_flight[node]

    def breaker(self, node: str) -> CircuitBreaker:
        return self._breakers[node]

    def status(self) -> list[NodeStatus]:
        return [
            NodeStatus(
                node,
                self._breakers[node].state,
                self._in_flight[node],
                tuple(sorted(m for (n, m), ok in self._ready.items() if n == node and ok)),
                node in self._draining,
            )
            for node in sorted(self._sources)
        ]

    def _set(self, node: str, triton_model: str, ready: bool) -> None:
        before = self._ready.get((node, triton_model))
        self._ready[(node, triton_model)] = ready
        if before != ready:
            log.info(
                "node readiness changed",
                extra={"fields": {"node": node, "triton_model": triton_model, "ready": ready}},
            )

    async def probe_once(self) -> None:
        """Ask every node about every Triton model it should serve, all at once."""
        pairs = sorted(
            {
                (node, where.triton_model)
                for where in (*self._placement.values(), *self._auxiliary.values())
                for node in self._nodes(where)
            }
        )
        results = await asyncio.gather(*(self._sources[n].ready(m) for n, m in pairs))
        answered: dict[str, bool] = {}
        for (node, triton_model), ready in zip(pairs, results, strict=True):
            if node not in self._sources or node in self._draining:
                continue  # removed while the probe ran
            self._set(node, triton_model, ready)
            answered[node] = answered.get(node, False) or ready
        for node, any_ready in answered.items():
            if not any_ready and node in self._breakers:  # (a node may have been reaped since)
                self._breakers[node].trip()
        for (node, triton_model), ready in zip(pairs, results, strict=True):
            held = self._leases.get((node, triton_model))
            if ready or not held:
                continue
            if not self._elsewhere(node, triton_model):
                # Moving would only turn a node that may yet answer into a certain failure;
                # the requests' own watchdogs still bound the wait.
                continue
            fields = {"node": node, "triton_model": triton_model, "requests": len(held)}
            log.warning("node failed its probe: moving its requests", extra={"fields": fields})
            for lease in tuple(held):
                lease.lose()
        serving = any(self.ready(model) for model in self._placement)
        if serving != self._serving:
            self._serving = serving
            if self._on_change is not None:
                await self._on_change(serving)

    def _elsewhere(self, node: str, triton_model: str) -> bool:
        """Whether another node can take requests for ``triton_model`` now."""
        return any(
            self._eligible(other, triton_model)
            for where in self._placement.values()
            if where.triton_model == triton_model
            for other in self._nodes(where)  # a DNS group's members, not its name
            if other != node
        )

    async def run(self, interval_s: float) -> None:
        """Probe forever, every ``interval_s`` seconds, and forget drained nodes; cancel the
        task to stop."""
        while True:
            await self.probe_once()
            await self.reap()
            await asyncio.sleep(interval_s)

    def pick(
        self, model: str, exclude: Collection[str] = (), affinity: str | None = None
    ) -> Lease | None:
        """Lease a node for catalog ``model`` (not one of ``exclude``), or None if none can serve.

        ``affinity``: a key (the prompt's prefix) whose requests should go to the same node.
        """
        where = self._placement.get(model)
        if where is None:
            return None
        eligible = [
            n
            for n in self._nodes(where)
            if n not in exclude and self._eligible(n, where.triton_model)
        ]
        if not eligible:
            return None
        node = self._choose(eligible, affinity)
        permit = self._breakers[node].acquire()
        if permit is None:  # cannot happen: availability was just checked, nothing awaited since
            return None
        self._in_flight[node] += 1
        return Lease(self, self._sources[node], where.triton_model, permit)

    def _choose(self, eligible: list[str], affinity: str | None) -> str:
        if affinity is not None and len(eligible) > 1:
            preferred = max(eligible, key=lambda n: _weight(n, affinity))
            least = min(self._in_flight[n] for n in eligible)
            if self._in_flight[preferred] <= least + self._slack:
                return preferred
        candidates = eligible if len(eligible) <= 2 else self._rng.sample(eligible, 2)
        least = min(self._in_flight[n] for n in candidates)
        return self._rng.choice([n for n in candidates if self._in_flight[n] == least])


def _weight(node: str, key: str) -> bytes:
    """Rendezvous hashing: each key prefers the node with the highest weight."""
    return hashlib.blake2b(f"{node}\0{key}".encode(), digest_size=8).digest()
