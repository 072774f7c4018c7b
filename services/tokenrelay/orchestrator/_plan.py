"""From a caller's request to what is sent to a model: a ``Plan`` per catalog model that may answer.

``Planner.plans`` resolves the model in the catalog, validates the request against it, renders
the chat template and fills the model's defaults, once; the fallback model (if the catalog names
one) gets a plan of its own when the request fits it. Retrieval adds context to those plans
(``Planner.with_context``) instead of planning again, and a stream that lost its node goes on
from a continuation of its plan (``Planner.continuation``; never for a plan under a constraint,
see ``Plan.continuable``).

Tools and response formats are planned here too: the template offers the tools (unless
``tool_choice`` is none); a forced tool choice becomes a constraint on the answer (a JSON schema
of one call in the model's tool-call format), as does a JSON response format — both with bounds
where the schema has none (``_schemas.bounded``); and the plan says how its answer is read for
tool calls (``ToolPlan``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from tokenrelay.config import Limits, ModelSpec
from tokenrelay.errors import InvalidRequest, ModelNotFound
from tokenrelay.generation import (
    GenerationRequest,
    ResponseFormatType,
    RetrievalReport,
    StructuredOutput,
    ToolChoiceMode,
)
from tokenrelay.orchestrator._schemas import bounded, precheck
from tokenrelay.orchestrator._tools import FORMATS, ToolCallParser, ToolFormat
from tokenrelay.orchestrator._validate import validate
from tokenrelay.templates import ChatTemplate

__all__ = ["Plan", "Planner", "ToolPlan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a plan's answer is read for tool calls: in ``format``; ``forced``: the answer is one
    call, constrained; ``parallel`` false: at most one call."""

    format: ToolFormat
    forced: bool = False
    parallel: bool = True

    def parser(self) -> ToolCallParser:
        """A parser for one answer (each choice needs its own)."""
        return self.format.parser(forced=self.forced, parallel=self.parallel)


@dataclass(frozen=True, slots=True)
class Plan:
    """A request made ready for one catalog model: validated, templated, defaults filled."""

    spec: ModelSpec
    prompt: str
    request: GenerationRequest
    fallback: bool = False
    retrieval: RetrievalReport | None = None
    tools: ToolPlan | None = None  # None: the answer is text

    @property
    def stream_interval_s(self) -> float:
        """How long deltas may wait for company after a chunk (the request's, or the model's
        default)."""
        asked = self.request.stream_interval_ms
        return (self.spec.stream_interval_ms if asked is None else asked) / 1000

    @property
    def continuable(self) -> bool:
        """Whether another node may continue this plan's answer from its text so far: not under
        a constraint (a response format, a forced call), whose grammar would start over after
        the partial text rather than go on from it."""
        return self.request.sampling.structured is None


class Planner:
    """The catalog's models, their templates and the request limits. Safe for concurrent use."""

    def __init__(self, models: Iterable[ModelSpec], limits: Limits) -> None:
        self._specs = {m.id: m for m in models}
        self._templates = {
            m.id: ChatTemplate(m.chat_template, m.default_system_prompt)
            for m in self._specs.values()
        }
        self._limits = limits

    @property
    def specs(self) -> Iterable[ModelSpec]:
        return self._specs.values()

    def spec(self, model: str) -> ModelSpec:
        """The catalog entry of ``model``; raises ``InvalidRequest`` / ``ModelNotFound``."""
        spec = self._specs.get(model)
        if spec is None:
            if not model:
                raise InvalidRequest("'model' is required.", "model")
            raise ModelNotFound(model)
        return spec

    def precheck(self, request: GenerationRequest) -> None:
        """Check the request's schemas (tool parameters, response format) ahead of ``plans``,
        which then finds their verdicts remembered: the checks cost CPU in proportion to the
        schemas, so the relay runs this on a worker thread. Never raises."""
        limits = self._limits
        texts = [t.parameters for t in request.tools[: limits.max_tools]]
        precheck([*texts, request.response_format.schema], limits.max_schema_chars)

    def plans(self, request: GenerationRequest) -> list[Plan]:
        """The primary plan, then the fallback's (if any, and if the request fits it). Gives the
        request an id when it has none. Raises ``InvalidRequest`` (or a subclass) when the
        request may not be sent to its model."""
        spec = self.spec(request.model)
        request = dataclasses.replace(request, request_id=request.request_id or uuid.uuid4().hex)
        plans = [self._plan(spec, request, False)]
        if spec.fallback:
            try:
                plans.append(self._plan(self._specs[spec.fallback], request, True))
            except InvalidRequest as exc:
                log.info(
                    "request does not fit the fallback model",
                    extra={"fields": {"fallback": spec.fallback, "error": exc.message}},
                )
        return plans

    def with_context(
        self, plans: list[Plan], augmented: GenerationRequest, report: RetrievalReport
    ) -> list[Plan]:
        """``plans`` with the retrieval stage's context in their prompts (``augmented`` is the
        caller's request with the context added to its messages or prompt) and its report.
        A fallback that no longer fits is dropped; the primary must fit (the stage sized the
        context for it) and raises ``InvalidRequest`` otherwise."""
        out = []
        for plan in plans:
            request = dataclasses.replace(
                plan.request, messages=augmented.messages, prompt=augmented.prompt
            )
            try:
                validate(request, plan.spec, self._limits)
            except InvalidRequest:
                if not plan.fallback:
                    raise
                continue
            out.append(
                dataclasses.replace(
                    plan, prompt=self._render(plan.spec, request), request=request, retrieval=report
                )
            )
        return out

    def continuation(self, plan: Plan, text: str, produced: int, number: int) -> Plan:
        """``plan`` continued once ``text`` (``produced`` tokens) went out to the caller: the
        same rendered prompt with ``text`` after it — where the template left the assistant's
        turn open, so the model reads it as its own partial answer — ``max_tokens`` reduced by
        ``produced`` (at least 1 is left: the caller checks there is room), the same stop
        sequences, seed and other parameters, and a request id of its own (``-c<number>``: a
        node may still be tearing the interrupted request down)."""
        sampling = plan.request.sampling
        limit = sampling.max_tokens or plan.spec.default_max_tokens
        request = dataclasses.replace(
            plan.request,
            sampling=dataclasses.replace(sampling, max_tokens=max(limit - produced, 1)),
            request_id=f"{plan.request.request_id}-c{number}",
        )
        return dataclasses.replace(plan, prompt=plan.prompt + text, request=request)

    def _render(self, spec: ModelSpec, request: GenerationRequest) -> str:
        if request.messages is not None:
            offered = request.tools if request.tool_choice.mode != ToolChoiceMode.NONE else ()
            return self._templates[spec.id].render(request.messages, offered)
        return request.prompt or ""

    def _plan(self, spec: ModelSpec, request: GenerationRequest, fallback: bool) -> Plan:
        validate(request, spec, self._limits)
        sampling = request.sampling
        if sampling.max_tokens is None:
            sampling = dataclasses.replace(sampling, max_tokens=spec.default_max_tokens)
        tools, structured = _constraints(spec, request)
        if structured is not None:
            sampling = dataclasses.replace(sampling, structured=structured)
        request = dataclasses.replace(request, sampling=sampling)
        return Plan(spec, self._render(spec, request), request, fallback, tools=tools)


def _constraints(
    spec: ModelSpec, request: GenerationRequest
) -> tuple[ToolPlan | None, StructuredOutput | None]:
    """How the answer is read for tool calls, and the constraint on its text (a validated
    request: the model has a tool format when tools are offered)."""
    structured = None
    response_format = request.response_format
    if response_format.type == ResponseFormatType.JSON_OBJECT:
        structured = StructuredOutput(json_object=True)
    elif response_format.type == ResponseFormatType.JSON_SCHEMA:
        schema = bounded(json.loads(response_format.schema))
        structured = StructuredOutput(schema=json.dumps(schema, separators=(",", ":")))
    choice = request.tool_choice
    if not request.tools or choice.mode == ToolChoiceMode.NONE:
        return None, structured
    tool_format = FORMATS[spec.tool_parser]
    forced = choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)
    if forced:
        chosen = (
            request.tools
            if choice.mode == ToolChoiceMode.REQUIRED
            else tuple(t for t in request.tools if t.name == choice.function)
        )
        schema = bounded(tool_format.call_schema(chosen))
        structured = StructuredOutput(schema=json.dumps(schema, separators=(",", ":")))
    return ToolPlan(tool_format, forced, request.parallel_tool_calls), structured
