"""The orchestrator's logic: from a caller's request to a stream of chunks from a Triton node.

Resolve the model in the catalog, validate, apply the chat template, pick a ready node, stream
the answer under three watchdogs (first token, silence between tokens, total deadline), count
usage. Transport-free: the gRPC servicer converts its messages to these types and back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from tokenrelay.config import ModelSpec, Settings
from tokenrelay.errors import (
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.generation import FinishReason, GenerationRequest, TokenSource, Usage
from tokenrelay.logs import bind
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._validate import validate
from tokenrelay.templates import ChatTemplate

__all__ = ["Chunk", "ModelStatus", "Relay", "StreamEnd", "StreamStart"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamStart:
    request_id: str
    model: str
    node: str
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnd:
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a stream: ``start`` on the first only, ``end`` on the last only."""

    text: str
    start: StreamStart | None = None
    end: StreamEnd | None = None


@dataclass(frozen=True, slots=True)
class ModelStatus:
    spec: ModelSpec
    ready: bool
    created: int


class Relay:
    """Serves generation requests over a ``NodePool``. Safe for any number of concurrent calls."""

    def __init__(self, settings: Settings, pool: NodePool) -> None:
        self._settings = settings
        self._pool = pool
        self._specs: Mapping[str, ModelSpec] = {m.id: m for m in settings.models}
        self._templates = {
            m.id: ChatTemplate(m.chat_template, m.default_system_prompt) for m in settings.models
        }
        self._created = int(time.time())

    def models(self) -> list[ModelStatus]:
        return [
            ModelStatus(spec, self._pool.ready(spec.triton_model), self._created)
            for spec in self._specs.values()
        ]

    def _prepare(self, request: GenerationRequest) -> tuple[ModelSpec, str, GenerationRequest]:
        spec = self._specs.get(request.model)
        if spec is None:
            if not request.model:
                raise InvalidRequest("'model' is required.", "model")
            raise ModelNotFound(request.model)
        validate(request, spec, self._settings.orchestrator.limits)
        if request.messages is not None:
            prompt = self._templates[spec.id].render(request.messages)
        else:
            prompt = request.prompt or ""
        sampling = request.sampling
        if sampling.max_tokens is None:
            sampling = dataclasses.replace(sampling, max_tokens=spec.default_max_tokens)
        request_id = request.request_id or uuid.uuid4().hex
        return spec, prompt, dataclasses.replace(request, sampling=sampling, request_id=request_id)

    async def stream(
        self, request: GenerationRequest, time_budget_s: float | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Generate ``request``'s answer as chunks.

        Raises ``InvalidRequest``/``ModelNotFound`` before anything is sent to a node,
        ``UpstreamUnavailable`` when no node can serve, ``UpstreamTimeout`` when a watchdog or the
        budget (``time_budget_s``, the caller's remaining deadline) expires, ``GenerationFailed``
        when the model fails. Closing the iterator cancels the generation on the node.
        """
        spec, prompt, request = self._prepare(request)
        with bind(request_id=request.request_id, model=spec.id):
            node = self._pool.pick(spec.triton_model)
            if node is None:
                raise UpstreamUnavailable(f"No inference node is ready to serve '{spec.id}'.")
            # aclosing: closing this stream must close the inner one too, which cancels the
            # generation at the node now rather than whenever the garbage collector runs.
            relayed = self._relay(spec, prompt, request, node, time_budget_s)
            with self._pool.lease(node.name):
                async with aclosing(relayed) as chunks:
                    async for chunk in chunks:
                        yield chunk

    async def _relay(
        self,
        spec: ModelSpec,
        prompt: str,
        request: GenerationRequest,
        source: TokenSource,
        time_budget_s: float | None,
    ) -> AsyncGenerator[Chunk, None]:
        timeouts = self._settings.orchestrator.timeouts
        loop = asyncio.get_running_loop()
        began = loop.time()
        budget = timeouts.total_s if time_budget_s is None else min(timeouts.total_s, time_budget_s)
        deadline = began + budget
        prompt_tokens = completion_tokens = 0
        first_token_at: float | None = None
        pending_start: StreamStart | None = StreamStart(request.request_id, spec.id, source.name)
        outcome = "error"
        deltas = source.generate(spec.triton_model, prompt, request.sampling, request.request_id)
        try:
            while True:
                watchdog = (
                    timeouts.first_token_s if first_token_at is None else timeouts.between_tokens_s
                )
                wait = min(watchdog, deadline - loop.time())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        delta = await anext(deltas)
                except TimeoutError:
                    raise UpstreamTimeout(
                        self._timeout_message(first_token_at, watchdog, wait)
                    ) from None
                except UpstreamUnavailable:
                    await self._pool.mark_down(source.name, spec.triton_model)
                    raise
                except StopAsyncIteration:
                    raise GenerationFailed(
                        "The model ended without finishing its answer."
                    ) from None
                if first_token_at is None:
                    first_token_at = loop.time()
                if delta.prompt_tokens is not None:
                    prompt_tokens = delta.prompt_tokens
                completion_tokens += delta.output_tokens
                end = None
                if delta.finish_reason is not None:
                    end = StreamEnd(delta.finish_reason, Usage(prompt_tokens, completion_tokens))
                if delta.text or end is not None:
                    yield Chunk(delta.text, pending_start, end)
                    pending_start = None
                if end is not None:
                    outcome = end.finish_reason.value
                    return
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            await deltas.aclose()
            log.info(
                "generation ended",
                extra={
                    "fields": {
                        "outcome": outcome,
                        "node": source.name,
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "ttft_s": None
                        if first_token_at is None
                        else round(first_token_at - began, 4),
                        "duration_s": round(loop.time() - began, 4),
                    }
                },
            )

    @staticmethod
    def _timeout_message(first_token_at: float | None, watchdog: float, wait: float) -> str:
        if wait < watchdog:
            return "The request's deadline expired before the answer was complete."
        if first_token_at is None:
            return f"The model produced no first token within {watchdog:g} s."
        return f"The model produced no token for {watchdog:g} s."
