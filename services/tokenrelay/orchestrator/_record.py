"""What one request did — attempts, winner, continuations, first-token time, outcome — for its
log line, its metrics and the GenAI attributes of its span (filled as the request goes)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Span

from tokenrelay.metrics import outcome_of
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._race import Attempt
from tokenrelay.tenancy import Identity, TenantMetrics, UsageLedger

__all__ = ["Record"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    metrics: RelayMetrics
    model: str  # as the caller named it
    began: float  # on the loop's clock
    outcome: str = "failed"
    attempts: list[Attempt] = field(default_factory=list)
    winners: list[Attempt] = field(default_factory=list)  # every choice's, as they came
    continuations: list[Attempt] = field(default_factory=list)  # the answers' later winners
    ttft_s: float | None = None
    retries: int = 0
    hedges: int = 0
    # The call's span, taken now: the request may end where it is no longer current (a stream
    # closed from another task).
    span: Span = field(default_factory=trace.get_current_span)
    label: str = ""
    completed: bool = False  # the last chunk went out
    identity: Identity | None = None
    tenants: TenantMetrics | None = None
    ledger: UsageLedger | None = None
    # What the caller was told it used, when the request ended on a token limit (the usage of
    # the pieces delivered; the one withheld is not counted).
    delivered: tuple[int, int] | None = None
    # What went out so far, over every choice and attempt (the prompt once, and each
    # continuation's).
    sent_prompt: int = 0
    sent_completion: int = 0

    def __post_init__(self) -> None:
        self.label = self.metrics.model(self.model)

    def complete(self, finish_reason: str) -> None:
        """The answer's last chunk is out: it ended with ``finish_reason``, whatever follows."""
        self.outcome, self.completed = finish_reason, True

    def fail(self, exc: BaseException) -> None:
        """Record how the request ended when it did not finish (a request already complete
        stays so: its caller left after the last chunk)."""
        if self.completed:
            return
        cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
        self.outcome = "cancelled" if cancelled else outcome_of(exc)

    @property
    def winner(self) -> Attempt | None:
        """The attempt that produced the request's first token (of any choice)."""
        return self.winners[0] if self.winners else None

    @property
    def prompt_tokens(self) -> int:
        """The prompt tokens of the answer's attempts: the prompt once (all choices share it),
        and each continuation's."""
        if not self.winners:
            return 0
        return self.winners[0].prompt_tokens + sum(c.prompt_tokens for c in self.continuations)

    @property
    def completion_tokens(self) -> int:
        """Every token generated for the request, by losing and failed attempts too."""
        return sum(a.completion_tokens for a in self.attempts)

    def _usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the answers the caller got: their winners' (the
        prompt once) and continuations' — or, when a token limit ended the request, what was
        delivered before it."""
        if self.delivered is not None:
            return self.delivered
        if not self.winners:
            return (0, 0)
        chain = [*self.winners, *self.continuations]
        return self.prompt_tokens, sum(a.completion_tokens for a in chain)

    def _tenant(self) -> None:
        identity = self.identity
        if identity is None:
            return
        prompt, completion = self._usage()
        if self.tenants is not None:
            key, tier = identity.label, identity.tier
            self.tenants.requests.labels(key, tier, self.outcome).inc()
            if prompt:
                self.tenants.tokens.labels(key, tier, "prompt").inc(prompt)
            if completion:
                self.tenants.tokens.labels(key, tier, "completion").inc(completion)
        if self.ledger is not None:
            self.ledger.record(identity.key_id, self.label, self.outcome, prompt, completion)

    def observe(self, now: float) -> None:
        """The request's metrics and span attributes, once it has ended."""
        self._tenant()
        metrics, label = self.metrics, self.label
        metrics.requests.labels(label, self.outcome).inc()
        metrics.duration.labels(label).observe(now - self.began)
        if self.ttft_s is not None:
            metrics.ttft.labels(label).observe(self.ttft_s)
        if self.attempts:
            metrics.prompt_tokens.labels(label).inc(self.prompt_tokens)
            metrics.completion_tokens.labels(label).inc(self.completion_tokens)
        if self.retries:
            metrics.retries.labels(label).inc(self.retries)
        if self.hedges:
            metrics.hedges.labels(label).inc(self.hedges)
        winner = self.winner
        if winner is not None and winner.plan.fallback:
            metrics.fallbacks.labels(label).inc()
        span = self.span
        span.set_attribute("tokenrelay.outcome", self.outcome)
        span.set_attribute("tokenrelay.attempts", len(self.attempts))
        if self.continuations:
            span.set_attribute("tokenrelay.continuations", len(self.continuations))
        if winner is not None:
            span.set_attribute("gen_ai.response.model", winner.plan.spec.id)
            span.set_attribute("gen_ai.usage.input_tokens", self.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", self.completion_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [self.outcome])
            span.set_attribute("tokenrelay.node", winner.node)

    def log(self, now: float) -> None:
        winner = self.winner
        log.info(
            "generation ended",
            extra={
                "fields": {
                    "outcome": self.outcome,
                    "node": winner.node if winner else None,
                    "served_model": winner.plan.spec.id if winner else None,
                    "fallback": bool(winner and winner.plan.fallback),
                    "attempts": len(self.attempts),
                    "continuations": len(self.continuations),
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
                    "duration_s": round(now - self.began, 4),
                }
            },
        )
