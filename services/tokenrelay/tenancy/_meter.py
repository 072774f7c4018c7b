"""One request's tokens counted against its key's token limits, as they are generated.

A meter reserves tokens from the store a chunk at a time (one store call per chunk, not per
token) and spends them locally; what is reserved and not spent is given back when the request
ends. A charge that the store cannot cover raises, and the caller withholds the piece it was
for: a key's tokens per minute and its budget are never overspent, and the usage a request
reports is what it delivered.
"""

from __future__ import annotations

import logging

from tokenrelay.errors import Overloaded, QuotaExceeded, RelayError
from tokenrelay.tenancy._identity import Identity
from tokenrelay.tenancy._limits import LimitStore, TokenAsk, TokenGrant

__all__ = ["TokenMeter"]

log = logging.getLogger(__name__)


class TokenMeter:
    """The token account of one request of ``identity`` (who must have ``metered_tokens``).

    ``open`` before the request is admitted, ``charge`` before each piece goes out, ``close``
    when it has ended (always; it gives back what was reserved and not spent)."""

    def __init__(self, store: LimitStore, identity: Identity, chunk: int = 64) -> None:
        self._store = store
        self._identity = identity
        per_minute = identity.tokens_per_minute
        # A small limit is reserved in small steps, so that one stream does not hold what a
        # concurrent one of the same key could use.
        self._chunk = max(1, min(chunk, per_minute // 8)) if per_minute else chunk
        self._reserved = 0  # taken from the store, not spent yet
        self.spent = 0

    def _ask(self, tokens: int) -> TokenAsk:
        identity = self._identity
        return TokenAsk(
            identity.key_id,
            tokens,
            identity.tokens_per_minute,
            identity.token_budget,
            identity.budget_period,
        )

    def _refusal(self, grant: TokenGrant) -> RelayError:
        identity = self._identity
        if grant.exhausted == "budget":
            return QuotaExceeded(
                f"The token budget of this key is spent: {identity.token_budget} tokens per"
                f" {identity.budget_period}.",
                retry_after=grant.retry_after_s,
            )
        return Overloaded(
            f"Rate limit reached: {identity.tokens_per_minute} tokens per minute for this key.",
            retry_after=grant.retry_after_s,
            code="rate_limit_exceeded",
        )

    async def _reserve(self, tokens: int) -> TokenGrant:
        grant = await self._store.take_tokens(self._ask(tokens))
        self._reserved += grant.granted
        return grant

    async def open(self) -> None:
        """Check that the key has tokens left (reserving one); raises ``Overloaded`` (tokens
        per minute) or ``QuotaExceeded`` (budget) with when to retry, or ``LimitsUnavailable``."""
        grant = await self._reserve(1)
        if not grant.granted:
            raise self._refusal(grant)

    async def charge(self, tokens: int) -> None:
        """Spend ``tokens``; raises (as ``open``) when the key cannot cover all of them, and
        then spends none."""
        if tokens <= 0:
            return
        if tokens > self._reserved:
            grant = await self._reserve(max(self._chunk, tokens - self._reserved))
            if tokens > self._reserved:
                raise self._refusal(grant)
        self._reserved -= tokens
        self.spent += tokens

    async def close(self) -> None:
        """Give back what was reserved and not spent. Never raises; a second call does nothing."""
        unused, self._reserved = self._reserved, 0
        if not unused:
            return
        try:
            await self._store.give_back_tokens(self._ask(unused))
        except RelayError as exc:  # a closed store: the bucket refills, the budget keeps them
            log.info("unused tokens not given back", extra={"fields": {"error": exc.message}})
