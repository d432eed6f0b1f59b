"""OpenTelemetry traces of fleet runs: one trace per run, one span per node command.

Only the OpenTelemetry *API* is required. :func:`setup` installs the SDK's tracer
provider when the SDK is installed, so trace ids are real and travel to daemons in
``CommandInvocation.trace`` (W3C ``traceparent``), and adds an OTLP exporter when an
endpoint is configured (``--otlp-endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``). Without
the SDK every call here is a cheap no-op and ``traceparent`` stays empty.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["end_span", "setup", "start_node_span", "start_run_span"]

_TRACER_NAME = "aegis_edge_relay"
_propagator = TraceContextTextMapPropagator()


def setup(otlp_endpoint: str | None = None, *, insecure: bool = True) -> str:
    """Install the SDK tracer provider if available; returns a description for logs."""
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return "api-only"
    provider = TracerProvider(resource=Resource.create({"service.name": "aegis-edge-relay"}))
    described = "sdk"
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
            )
            described = f"otlp:{endpoint}"
        except ImportError:
            described = "sdk (otlp exporter not installed)"
    with contextlib.suppress(Exception):
        trace.set_tracer_provider(provider)
    return described


_tracer_cache: list[Any] = [None, None]  # [provider, its tracer]


def _tracer() -> trace.Tracer:
    # get_tracer() builds a new Tracer (and walks a deprecation wrapper) on every call:
    # ~10 us, once per command of a 10k-target run. Reuse it while the provider is the same.
    provider = trace.get_tracer_provider()
    if _tracer_cache[0] is not provider:
        _tracer_cache[0], _tracer_cache[1] = provider, trace.get_tracer(_TRACER_NAME)
    tracer: trace.Tracer = _tracer_cache[1]
    return tracer


def start_run_span(fleet_command_id: str, *, tool: str) -> tuple[Span, str]:
    """The root span of a fleet run (a new trace); returns it and its hex trace id."""
    span = _tracer().start_span(
        "fleet.run",
        context=otel_context.Context(),  # a new trace, whatever is current
        kind=SpanKind.INTERNAL,
        attributes={"fleet_command_id": fleet_command_id, "aegis.tool": tool},
    )
    ctx = span.get_span_context()
    trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
    return span, trace_id


def start_node_span(
    parent: Any, *, node_id: str, tool: str, fleet_command_id: str, command_id: str
) -> tuple[Span, str, str]:
    """A span for one node's command, under ``parent`` (a run span) if given.

    Returns the span and the ``traceparent``/``tracestate`` to put in the invocation.
    """
    ctx = trace.set_span_in_context(parent) if parent is not None else otel_context.Context()
    span = _tracer().start_span(
        f"command {tool}",
        context=ctx,
        kind=SpanKind.CLIENT,
        attributes={
            "fleet_command_id": fleet_command_id,
            "aegis.node_id": node_id,
            "aegis.command_id": command_id,
            "aegis.tool": tool,
        },
    )
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier.get("traceparent", ""), carrier.get("tracestate", "")


def end_span(span: Any, outcome: str) -> None:
    if span is None:
        return
    with contextlib.suppress(Exception):
        span.set_attribute("aegis.outcome", outcome)
        if outcome not in ("ok", "completed"):
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()
