"""Per-key limits behind one seam: requests per minute, concurrent streams, and tokens (per
minute and per budget period), taken and given back atomically.

``LimitStore`` is the seam. ``LocalLimits`` keeps the counters in this process (each replica, and
each worker process, then enforces a key's limits on its own: N of them let a key do N times
as much); ``RedisLimits`` (``_redis.py``) keeps them in one Redis so that they hold across every
replica; ``FailoverLimits`` (``_failover.py``) puts a policy in front of a shared store for when
it cannot be reached. Every implementation follows the same semantics, which the tests check on
each:

- requests per minute and tokens per minute are token buckets: ``limit`` of capacity, refilled
  continuously at ``limit / 60`` per second;
- a budget is a count per key and period (a UTC day or month) that only grows until the period
  ends;
- concurrent streams are leases, each held until released (a shared store lets a lease that is
  not renewed expire, so that a replica that died does not hold its streams forever).
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "LimitStore",
    "LocalLimits",
    "StreamLease",
    "TokenAsk",
    "TokenGrant",
    "period_of",
]


def period_of(period: str, now: float) -> tuple[str, float]:
    """The budget period (``day`` or ``month``, UTC) holding the Unix time ``now``: its name
    (``2026-05-03`` or ``2026-05``) and the seconds left in it."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        month = start.month % 12 + 1
        end = start.replace(year=start.year + (start.month == 12), month=month)
        name = start.strftime("%Y-%m")
    else:
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
        name = start.strftime("%Y-%m-%d")
    return name, (end - moment).total_seconds()


@dataclass(frozen=True, slots=True)
class TokenAsk:
    """Tokens wanted by one key: from its per-minute bucket (``per_minute`` 0: none) and its
    budget (``budget`` 0: none) of the ``period`` holding now."""

    key: str
    wanted: int
    per_minute: int = 0
    budget: int = 0
    period: str = "day"


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a ``TokenAsk`` got: ``granted`` tokens (maybe fewer than wanted, 0 when none are
    left); when fewer, ``exhausted`` says which limit ran out (``tokens_per_minute`` or
    ``budget``) and ``retry_after_s`` when there will be some again."""

    granted: int
    exhausted: str = ""
    retry_after_s: float = 0.0


class StreamLease(Protocol):
    """One of a key's concurrent streams."""

    async def release(self) -> None:
        """Give the stream back. A second call does nothing; never raises."""
        ...


class LimitStore(Protocol):
    """Where the counters of every key live. Every method is safe for concurrent calls. A
    shared store raises ``tokenrelay.tenancy.StoreDown`` when it cannot be reached."""

    async def take_request(self, key: str, per_minute: int) -> float:
        """Count one request of ``key`` against ``per_minute``: 0.0 when it may go, else the
        seconds until one could (nothing is taken then)."""
        ...

    async def open_stream(self, key: str, limit: int) -> StreamLease | None:
        """One of at most ``limit`` concurrent streams of ``key``, or None when all are taken."""
        ...

    async def take_tokens(self, ask: TokenAsk) -> TokenGrant:
        """Take up to ``ask.wanted`` tokens from every limit the ask names, atomically."""
        ...

    async def give_back_tokens(self, ask: TokenAsk) -> None:
        """Return ``ask.wanted`` tokens taken earlier and not used (a bucket is not filled past
        its capacity, a budget not below 0)."""
        ...

    async def close(self) -> None:
        """Release connections and background work. Safe to call more than once."""
        ...


class _LocalLease:
    __slots__ = ("_key", "_lease", "_store")

    def __init__(self, store: LocalLimits, key: str) -> None:
        self._store = store
        self._key = key
        self._lease: str | None = uuid.uuid4().hex

    async def release(self) -> None:
        if self._lease is None:
            return
        self._lease = None
        count = self._store._streams.get(self._key, 0) - 1
        if count > 0:
            self._store._streams[self._key] = count
        else:
            self._store._streams.pop(self._key, None)


class LocalLimits:
    """The counters in this process's memory (see the module docstring). Nothing awaits, so no
    call can interleave with another. ``clock`` is monotonic (buckets), ``wall`` is Unix time
    (budget periods)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._streams: dict[str, int] = {}
        self._budgets: dict[tuple[str, str], int] = {}  # (key, period) -> used

    def _bucket(self, name: str, capacity: int) -> float:
        now = self._clock()
        tokens, at = self._buckets.get(name, (float(capacity), now))
        tokens = min(float(capacity), tokens + (now - at) * capacity / 60.0)
        self._buckets[name] = (tokens, now)
        return tokens

    def _set(self, name: str, tokens: float) -> None:
        self._buckets[name] = (tokens, self._clock())

    async def take_request(self, key: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        name = f"rpm:{key}"
        tokens = self._bucket(name, per_minute)
        if tokens < 1.0:
            return (1.0 - tokens) * 60.0 / per_minute
        self._set(name, tokens - 1.0)
        return 0.0

    async def open_stream(self, key: str, limit: int) -> StreamLease | None:
        count = self._streams.get(key, 0)
        if limit > 0 and count >= limit:
            return None
        self._streams[key] = count + 1
        return _LocalLease(self, key)

    async def take_tokens(self, ask: TokenAsk) -> TokenGrant:
        granted, exhausted, retry = max(ask.wanted, 0), "", 0.0
        name = f"tpm:{ask.key}"
        tokens = 0.0
        if ask.per_minute > 0:
            tokens = self._bucket(name, ask.per_minute)
            if int(tokens) < granted:
                granted = int(tokens)
                exhausted = "tokens_per_minute"
                retry = (1.0 - (tokens - granted)) * 60.0 / ask.per_minute
        period = ""
        if ask.budget > 0:
            period, left_s = period_of(ask.period, self._wall())
            left = ask.budget - self._budgets.get((ask.key, period), 0)
            if left < granted or left <= 0:
                granted = max(left, 0)
                exhausted, retry = "budget", left_s
        if ask.per_minute > 0:
            self._set(name, tokens - granted)
        if ask.budget > 0:
            self._budgets[(ask.key, period)] = self._budgets.get((ask.key, period), 0) + granted
        return TokenGrant(granted, exhausted if granted < ask.wanted else "", retry)

    async def give_back_tokens(self, ask: TokenAsk) -> None:
        if ask.wanted <= 0:
            return
        if ask.per_minute > 0:
            name = f"tpm:{ask.key}"
            self._set(
                name, min(float(ask.per_minute), self._bucket(name, ask.per_minute) + ask.wanted)
            )
        if ask.budget > 0:
            period, _ = period_of(ask.period, self._wall())
            used = self._budgets.get((ask.key, period), 0)
            self._budgets[(ask.key, period)] = max(used - ask.wanted, 0)

    async def close(self) -> None:
        return None
