"""The policy for a shared store that cannot be reached (``tenancy.on_store_failure``).

- ``open``: each call the store cannot answer is answered by this process's own counters
  (``LocalLimits``), so limits still hold per process — a key may then do up to N times its
  limits across N replicas — and a warning is logged once per outage;
- ``closed``: the call raises ``LimitsUnavailable`` (503): nothing is served that cannot be
  counted.

After a failure the store is left alone for ``retry_s`` (no call then pays its timeout), then
tried again; the first call that succeeds ends the outage (logged). A stream lease or token
grant taken from one side is given back to the same side.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tokenrelay.errors import LimitsUnavailable
from tokenrelay.tenancy._limits import LimitStore, LocalLimits, StreamLease, TokenAsk, TokenGrant
from tokenrelay.tenancy._redis import StoreDown

__all__ = ["FailoverLimits"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_REFUSAL = "The rate-limit store is unavailable; retry later."


class FailoverLimits:
    """A shared ``LimitStore`` with the failure policy in front of it (see the module
    docstring). ``on_failure``: ``open`` or ``closed``."""

    def __init__(
        self,
        shared: LimitStore,
        on_failure: str,
        retry_s: float = 1.0,
        fallback: LocalLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_change(down)`` is told when an outage begins and ends (a metric)."""
        self._shared = shared
        self._open = on_failure == "open"
        self._retry_s = retry_s
        self._fallback = fallback or LocalLimits()
        self._clock = clock
        self._down_until: float | None = None
        self._on_change = on_change
        self._local_out: dict[str, int] = {}  # tokens the fallback granted, per key

    @property
    def down(self) -> bool:
        return self._down_until is not None

    def _failed(self, exc: StoreDown) -> None:
        if self._down_until is None:
            log.warning(
                "limits store unreachable: "
                + ("per-process limits until it is back" if self._open else "refusing requests"),
                extra={"fields": {"error": str(exc), "policy": "open" if self._open else "closed"}},
            )
            if self._on_change is not None:
                self._on_change(True)
        self._down_until = self._clock() + self._retry_s

    def _recovered(self) -> None:
        if self._down_until is not None:
            log.warning("limits store reachable again")
            self._down_until = None
            self._local_out.clear()  # what is still out is given back to the shared store
            if self._on_change is not None:
                self._on_change(False)

    async def _either(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """The shared store's answer, or the policy's; the flag says which side answered."""
        if self._down_until is None or self._clock() >= self._down_until:
            try:
                answer = await shared()
            except StoreDown as exc:
                self._failed(exc)
            else:
                self._recovered()
                return answer, True
        if not self._open:
            raise LimitsUnavailable(_REFUSAL)
        return await local(), False

    async def take_request(self, key: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        wait, _ = await self._either(
            lambda: self._shared.take_request(key, per_minute),
            lambda: self._fallback.take_request(key, per_minute),
        )
        return wait

    async def open_stream(self, key: str, limit: int) -> StreamLease | None:
        lease, _ = await self._either(
            lambda: self._shared.open_stream(key, limit),
            lambda: self._fallback.open_stream(key, limit),
        )
        return lease

    async def take_tokens(self, ask: TokenAsk) -> TokenGrant:
        grant, shared = await self._either(
            lambda: self._shared.take_tokens(ask), lambda: self._fallback.take_tokens(ask)
        )
        if not shared and grant.granted:
            self._local_out[ask.key] = self._local_out.get(ask.key, 0) + grant.granted
        return grant

    async def give_back_tokens(self, ask: TokenAsk) -> None:
        # Tokens the fallback granted go back to it first; the rest to the shared store.
        local = min(ask.wanted, self._local_out.get(ask.key, 0))
        if local:
            left = self._local_out[ask.key] - local
            if left:
                self._local_out[ask.key] = left
            else:
                del self._local_out[ask.key]
            await self._fallback.give_back_tokens(dataclasses.replace(ask, wanted=local))
        if ask.wanted > local:
            rest = dataclasses.replace(ask, wanted=ask.wanted - local)
            try:
                await self._shared.give_back_tokens(rest)
            except StoreDown as exc:  # the bucket refills by itself; a budget keeps them
                self._failed(exc)

    async def close(self) -> None:
        await self._shared.close()
        await self._fallback.close()
