"""The shared limits store: every counter in one Redis, changed by Lua scripts (each runs
atomically, on Redis's own clock), so that limits hold across every replica and worker.

Keys (``prefix`` first, ``tokenrelay:`` by default): ``rpm:<key>`` and ``tpm:<key>`` are token
buckets (a hash of tokens and the time they were counted; a bucket left alone for a minute is
full, so it expires), ``budget:<key>:<period>`` a counter that expires a day after its period,
``streams:<key>`` a sorted set of stream leases scored by their expiry. A replica renews the
leases it holds every third of ``lease_ttl_s``; the leases of one that died expire.

Every call is bounded by ``timeout_s``; a Redis that cannot be reached, refuses or is too slow
raises ``StoreDown`` (see ``_failover.py`` for the policy then).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tokenrelay.tenancy._limits import StreamLease, TokenAsk, TokenGrant, period_of

__all__ = ["RedisLimits", "StoreDown"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

_REFILL = """
local function refill(key, capacity, now)
  local b = redis.call('HMGET', key, 't', 'at')
  local tokens = tonumber(b[1]) or capacity
  local at = tonumber(b[2]) or now
  return math.min(capacity, tokens + math.max(0, now - at) * capacity / 60)
end
local function store(key, tokens, now)
  redis.call('HSET', key, 't', tokens, 'at', now)
  redis.call('PEXPIRE', key, 61000)
end
"""

# KEYS[1] bucket; ARGV[1] capacity per minute. Returns the wait in seconds (0: taken), as text.
_TAKE_REQUEST = (
    _NOW
    + _REFILL
    + """
local cap = tonumber(ARGV[1])
local tokens = refill(KEYS[1], cap, now)
if tokens < 1 then
  return tostring((1 - tokens) * 60 / cap)
end
store(KEYS[1], tokens - 1, now)
return '0'
"""
)

# KEYS[1] tpm bucket, KEYS[2] budget counter; ARGV: wanted, tpm, budget, budget ttl (s),
# seconds left in the period. Returns {granted, exhausted, retry_after_s as text}.
_TAKE_TOKENS = (
    _NOW
    + _REFILL
    + """
local wanted = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local granted = wanted
local exhausted = ''
local retry = 0
local tokens = 0
if tpm > 0 then
  tokens = refill(KEYS[1], tpm, now)
  local whole = math.floor(tokens)
  if whole < granted then
    granted = whole
    exhausted = 'tokens_per_minute'
    retry = (1 - (tokens - whole)) * 60 / tpm
  end
end
if budget > 0 then
  local left = budget - tonumber(redis.call('GET', KEYS[2]) or '0')
  if left < granted or left <= 0 then
    granted = math.max(left, 0)
    exhausted = 'budget'
    retry = tonumber(ARGV[5])
  end
end
if tpm > 0 then
  store(KEYS[1], tokens - granted, now)
end
if budget > 0 and granted > 0 then
  redis.call('INCRBY', KEYS[2], granted)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
if granted >= wanted then
  exhausted = ''
end
return {granted, exhausted, tostring(retry)}
"""
)

# KEYS[1] tpm bucket, KEYS[2] budget counter; ARGV: tokens, tpm, budget.
_GIVE_BACK = (
    _NOW
    + _REFILL
    + """
local n = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
if tpm > 0 then
  store(KEYS[1], math.min(tpm, refill(KEYS[1], tpm, now) + n), now)
end
if tonumber(ARGV[3]) > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used > 0 then
    redis.call('SET', KEYS[2], math.max(used - n, 0), 'KEEPTTL')
  end
end
return 1
"""
)

# KEYS[1] the key's leases; ARGV: limit, lease id, ttl (ms). Returns 1 when leased, else 0.
_OPEN_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS: lease sets; ARGV[1] ttl (ms), ARGV[1 + i] the lease id in KEYS[i].
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


class StoreDown(Exception):
    """The shared store could not be reached, refused the call or did not answer in time."""


class _RedisLease:
    __slots__ = ("_id", "_key", "_store")

    def __init__(self, store: RedisLimits, key: str, lease_id: str) -> None:
        self._store = store
        self._key = key
        self._id: str | None = lease_id

    async def release(self) -> None:
        if self._id is None:
            return
        lease_id, self._id = self._id, None
        await self._store._release(self._key, lease_id)


class RedisLimits:
    """``LimitStore`` on Redis (see the module docstring). Create and close it inside the event
    loop that uses it."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.5,
        prefix: str = "tokenrelay:",
        lease_ttl_s: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        # No retries inside the client: a store that is down must cost one bounded wait, and the
        # failover policy decides what happens next.
        # A bounded pool that makes a burst wait for a connection instead of opening one each.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._take_request = self._redis.register_script(_TAKE_REQUEST)
        self._take_tokens = self._redis.register_script(_TAKE_TOKENS)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._open = self._redis.register_script(_OPEN_STREAM)
        self._renew_script = self._redis.register_script(_RENEW)
        self._held: dict[str, str] = {}  # lease id -> its set's key
        self._renewer: asyncio.Task[None] | None = None

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Raises ``StoreDown`` unless Redis answers."""
        await self._call(self._redis.ping())

    async def take_request(self, key: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        wait: Any = await self._call(
            self._take_request(keys=[f"{self._prefix}rpm:{key}"], args=[per_minute])
        )
        return float(wait)

    def _token_keys(self, ask: TokenAsk) -> tuple[list[str], float]:
        period, left_s = period_of(ask.period, time.time())
        keys = [f"{self._prefix}tpm:{ask.key}", f"{self._prefix}budget:{ask.key}:{period}"]
        return keys, left_s

    async def take_tokens(self, ask: TokenAsk) -> TokenGrant:
        if ask.wanted <= 0 or (ask.per_minute <= 0 and ask.budget <= 0):
            return TokenGrant(max(ask.wanted, 0))
        keys, left_s = self._token_keys(ask)
        answer: Any = await self._call(
            self._take_tokens(
                keys=keys,
                args=[ask.wanted, ask.per_minute, ask.budget, int(left_s) + 86_400, left_s],
            )
        )
        granted, exhausted, retry = answer
        reason = exhausted.decode() if isinstance(exhausted, bytes) else str(exhausted)
        return TokenGrant(int(granted), reason, float(retry))

    async def give_back_tokens(self, ask: TokenAsk) -> None:
        if ask.wanted <= 0 or (ask.per_minute <= 0 and ask.budget <= 0):
            return
        keys, _ = self._token_keys(ask)
        await self._call(self._give_back(keys=keys, args=[ask.wanted, ask.per_minute, ask.budget]))

    async def open_stream(self, key: str, limit: int) -> StreamLease | None:
        lease_id = uuid.uuid4().hex
        name = f"{self._prefix}streams:{key}"
        leased: Any = await self._call(
            self._open(keys=[name], args=[limit, lease_id, self._lease_ttl_ms])
        )
        if not int(leased):
            return None
        self._held[lease_id] = name
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="lease-renewal")
        return _RedisLease(self, name, lease_id)

    async def _release(self, name: str, lease_id: str) -> None:
        self._held.pop(lease_id, None)
        try:
            await self._call(self._redis.zrem(name, lease_id))
        except StoreDown as exc:  # it expires by itself once no longer renewed
            log.warning(
                "could not release a stream lease; it will expire",
                extra={"fields": {"error": str(exc)}},
            )

    async def _renew_forever(self) -> None:
        interval = self._lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            held = dict(self._held)
            if not held:
                continue
            try:
                await self._call(
                    self._renew_script(
                        keys=list(held.values()), args=[self._lease_ttl_ms, *held.keys()]
                    )
                )
            except StoreDown as exc:
                log.warning("stream leases not renewed", extra={"fields": {"error": str(exc)}})

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        await self._redis.aclose(close_connection_pool=True)
