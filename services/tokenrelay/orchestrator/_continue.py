"""Continuation: an answer that outlives its node.

Once a token has gone out, starting over is no longer an option: the caller holds part of one
answer. But tokenrelay renders the prompt itself, so another node can *continue* it. When the
node serving a stream fails (an error, a stream that ends without finishing), is found hung (its
readiness probe failed: ``Lease.lost``) or stalls past ``between_tokens_s``, and the caller's
deadline has not passed, ``Continuer.stream`` starts a new first-token race over continuation
plans (``Planner.continuation``): the same rendered prompt with the text streamed so far after
it, as the assistant's partial turn, ``max_tokens`` reduced by what was produced, the same stop
sequences and seed. The new node's stream is spliced in: the caller's stream goes on with no gap
in the text and no error; its end carries the usage of every attempt in the chain (the
continuations' prompts included) and says how many continuations there were
(``StreamEnd.continued``). Each continuation is also a span event on the request's span
(``tokenrelay.continued``), a log line and a metric (``tokenrelay_continuations_total``,
``tokenrelay_continuation_gap_seconds``).

The continuation goes to another node of the same model, or to the catalog's fallback when the
model allows it (``fallback_continues``), never back to a node that failed this answer. Out of
continuations (``max_continuations``), with continuation off, past the deadline, for a failure
that is the request's own fault, or when no node can take the continuation, the stream ends as
it always did: with the interrupted node's error, carrying the usage so far.

What it cannot promise: a sampled answer's continuation is a different sample than the first
node would have produced (the seed restarts on the new prompt); greedy decoding continues the
same text up to tokenization (the text so far is tokenized afresh, which may split it
differently from how the model produced it); and the new node reads the whole prompt again, so
the splice costs one prompt's processing, plus the time to notice the failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from tokenrelay.config import Continuation, Routing
from tokenrelay.errors import (
    GenerationFailed,
    RelayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import Chunk, Continued, Delta, FinishReason, StreamEnd, Usage
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Plan, Planner
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._race import Attempt, FirstTokenRace
from tokenrelay.orchestrator._record import Record

__all__ = ["Continuer", "Follow"]

log = logging.getLogger(__name__)

Follow = Callable[[Attempt, Delta, float, Record], AsyncGenerator[Chunk, None]]
"""The relay's follower of one winning attempt: its chunks from the first delta on; raises the
``RelayError`` that interrupted it."""

# Failures of the node, which another node may not share. Not the request's own faults
# (InvalidRequest and its kind), nor admission's.
_CONTINUABLE = (UpstreamUnavailable, UpstreamTimeout, GenerationFailed)


def _reason(attempt: Attempt, exc: RelayError) -> str:
    """Why ``attempt``'s stream was interrupted, as the metric's label says it."""
    if attempt.lost:
        return "probe_failed"  # the node hung, or lost the model
    if isinstance(exc, UpstreamTimeout):
        return "stalled"
    return "node_failed"


class Continuer:
    """Follows a request's winning attempt and continues its answer elsewhere when the node
    fails; one per relay, safe for any number of concurrent streams."""

    def __init__(
        self,
        settings: Continuation,
        planner: Planner,
        pool: NodePool,
        routing: Routing,
        first_token_s: float,
        metrics: RelayMetrics,
    ) -> None:
        self._settings = settings
        self._planner = planner
        self._pool = pool
        self._routing = routing
        self._first_token_s = first_token_s
        self._metrics = metrics

    async def stream(
        self,
        follow: Follow,
        plans: list[Plan],
        attempt: Attempt,
        first: Delta,
        deadline: float,
        record: Record,
        index: int = 0,
        resumable: Callable[[], bool] = lambda: True,
    ) -> AsyncGenerator[Chunk, None]:
        """``follow``'s chunks for ``attempt`` (the winner of the race over ``plans``; choice
        ``index`` of the request), then, each time it is interrupted and may be continued, those
        of a continuation: one stream, whose only ``start`` is the first attempt's and whose
        ``end`` counts them all. ``resumable`` says whether the answer so far may be continued
        from its text (not under a constraint, no tool call begun). Raises the interruption's
        ``RelayError`` (with the usage of the whole chain) when the answer cannot be continued.
        Closing it closes the attempt that runs (cancelling it at its node)."""
        loop = asyncio.get_running_loop()
        chain = [attempt]
        texts: list[str] = []
        failed: set[str] = set()
        last_at = loop.time()
        while True:
            try:
                async with aclosing(follow(attempt, first, deadline, record)) as chunks:
                    async for chunk in chunks:
                        if len(chain) > 1:
                            spliced = self._spliced(chunk, chain)
                            if spliced is None:
                                continue
                            chunk = spliced
                        texts.append(chunk.text)
                        last_at = loop.time()
                        yield chunk
                return
            except RelayError as exc:
                # The usage so far: the attempts before this one, and what this one says (all
                # it generated, or only what was delivered when a token limit ended it).
                last = exc.usage or Usage(attempt.prompt_tokens, attempt.completion_tokens)
                exc.usage = _add(_usage(chain[:-1]), last)
                reason = _reason(attempt, exc)
                failed.add(attempt.node)
                if not (resumable() and self._may_continue(exc, chain, deadline)):
                    raise
                base = _base_plans(plans, chain[0].plan)
                limit = base[0].request.sampling.max_tokens or base[0].spec.default_max_tokens
                produced = sum(a.completion_tokens for a in chain)
                if produced >= limit:
                    # The node went away with the answer's last token: it ended by length.
                    end = StreamEnd(FinishReason.LENGTH, _usage(chain), _continued(chain))
                    yield Chunk("", None, end, index)
                    return
                text = "".join(texts)
                number = len(chain)
                continuation = [
                    self._planner.continuation(plan, text, produced, number) for plan in base
                ]
                race = FirstTokenRace(
                    continuation,
                    self._pool,
                    self._routing,
                    self._first_token_s,
                    deadline,
                    record.attempts,
                    exclude=set(failed),
                    route="continuation",
                )
                try:
                    attempt, first = await race.run()
                except RelayError as refused:
                    log.warning(
                        "stream could not be continued",
                        extra={"fields": {"node": chain[-1].node, "error": refused.message}},
                    )
                    raise exc from None
                finally:
                    record.retries += race.retries
                    record.hedges += race.hedges
                gap = loop.time() - last_at
                self._announce(record, chain[-1], attempt, reason, produced, gap)
                chain.append(attempt)
                record.continuations.append(attempt)

    def _may_continue(self, exc: RelayError, chain: list[Attempt], deadline: float) -> bool:
        settings = self._settings
        return (
            settings.enabled
            and len(chain) <= settings.max_continuations
            and isinstance(exc, _CONTINUABLE)
            and asyncio.get_running_loop().time() < deadline
        )

    @staticmethod
    def _spliced(chunk: Chunk, chain: list[Attempt]) -> Chunk | None:
        """A continuation's chunk as part of the one stream: no second ``start``; the end counts
        the whole chain. None for a chunk left with nothing to say."""
        end = chunk.end
        if end is not None:
            end = dataclasses.replace(end, usage=_usage(chain), continued=_continued(chain))
        elif not (chunk.text or chunk.tool_calls or chunk.logprobs):
            return None
        return dataclasses.replace(chunk, start=None, end=end)

    def _announce(
        self,
        record: Record,
        interrupted: Attempt,
        continuing: Attempt,
        reason: str,
        produced: int,
        gap: float,
    ) -> None:
        """The log line, metrics and span event of one continuation."""
        self._metrics.continuations.labels(record.label, reason).inc()
        self._metrics.continuation_gap.labels(record.label).observe(gap)
        fields: dict[str, str | int | float] = {
            "from_node": interrupted.node,
            "to_node": continuing.node,
            "served_model": continuing.plan.spec.id,
            "reason": reason,
            "after_tokens": produced,
            "gap_s": round(gap, 4),
        }
        log.warning("stream continued on another node", extra={"fields": fields})
        record.span.add_event(
            "tokenrelay.continued",
            {f"tokenrelay.{name}": value for name, value in fields.items()},
        )


def _base_plans(plans: list[Plan], serving: Plan) -> list[Plan]:
    """The plans a continuation may use: the one that served the answer, and after it the
    fallback's when the catalog lets the fallback continue the primary's answers (and it
    writes tool calls in the same format)."""
    base = [p for p in plans if p.spec.id == serving.spec.id]
    primary = plans[0]
    if not serving.fallback and primary.spec.fallback_continues:
        # Only a fallback that writes tool calls as the serving model does: the answer's one
        # parser reads the continuation too.
        tools = serving.tools.format if serving.tools is not None else None
        base += [
            p
            for p in plans
            if p.fallback and (p.tools.format if p.tools is not None else None) == tools
        ]
    return base


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens)


def _usage(chain: list[Attempt]) -> Usage:
    return Usage(sum(a.prompt_tokens for a in chain), sum(a.completion_tokens for a in chain))


def _continued(chain: list[Attempt]) -> Continued | None:
    if len(chain) == 1:
        return None
    return Continued(len(chain) - 1, _usage(chain[1:]))
