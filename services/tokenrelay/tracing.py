"""OpenTelemetry tracing: one trace per request, from the edge through the orchestrator to Triton.

The spans are made here by hand rather than by opentelemetry-instrumentation-grpc/-aiohttp: the
gRPC aio interceptors mishandle exactly what tokenrelay relies on, cancelling server-streamed
calls (open-telemetry/opentelemetry-python-contrib#2014: a cancelled streamed response raises in
the client interceptor; #3271: CancelledError does not propagate through the aio client
interceptors), and a client going away must cancel the Triton request. The context travels as
W3C ``traceparent`` (HTTP header → gRPC metadata → Triton's stream metadata, which Triton's own
``--trace-config mode=opentelemetry`` continues).

Span attributes follow the OpenTelemetry GenAI conventions where they apply
(``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` …). A request the client cancelled ends
its spans with ``tokenrelay.outcome = "cancelled"`` and an error status saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from tokenrelay.config import Tracing

__all__ = [
    "configure_tracing",
    "current_trace_id",
    "extract",
    "inject",
    "mark_cancelled",
    "mark_error",
    "server_span",
    "shutdown_tracing",
    "tracer",
]

log = logging.getLogger(__name__)


_provider: TracerProvider | None = None


def configure_tracing(service: str, settings: Tracing) -> None:
    """Install the process's tracer provider (once, at start-up)."""
    global _provider
    if settings.exporter == "none":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenrelay-{service}"}))
    if settings.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint))
        )
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on", extra={"fields": {"exporter": settings.exporter}})


def shutdown_tracing() -> None:
    """Export what is buffered (at exit)."""
    if _provider is not None:
        _provider.shutdown()


# Asked once: ``trace.get_tracer`` reads the environment and makes a tracer at each call (2-3 % of
# a request's CPU when it was called per span). Made before any provider is installed, it is
# OpenTelemetry's proxy, which uses the provider ``configure_tracing`` installs from then on.
_TRACER = trace.get_tracer("tokenrelay")


def tracer() -> trace.Tracer:
    return _TRACER


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(carrier)


def inject(span: Span | None = None) -> list[tuple[str, str]]:
    """The ``traceparent`` (and ``tracestate``) of ``span`` (default: the current one)."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(carrier, context=ctx)
    return list(carrier.items())


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def mark_cancelled(span: Span) -> None:
    """The caller went away before the request ended — unless the span already says how it
    ended (a caller that leaves right after the last chunk cancelled nothing)."""
    recorded = getattr(span, "attributes", None) or {}
    if recorded.get("tokenrelay.outcome", "cancelled") != "cancelled":
        return
    span.set_attribute("tokenrelay.outcome", "cancelled")
    span.set_status(Status(StatusCode.ERROR, "cancelled by the client"))


def mark_error(span: Span, outcome: str, message: str) -> None:
    span.set_attribute("tokenrelay.outcome", outcome)
    span.set_status(Status(StatusCode.ERROR, message))


@contextmanager
def server_span(
    name: str, carrier: Iterable[tuple[str, Any]], attributes: Mapping[str, Any] | None = None
) -> Iterator[Span]:
    """A SERVER span continuing the caller's trace (from ``carrier``), current in the block.

    Exceptions are not recorded here: the caller marks the outcome (a cancellation is not a
    failure of ours, and error text is for logs)."""
    parent = extract({str(k).lower(): str(v) for k, v in carrier})
    with tracer().start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span
