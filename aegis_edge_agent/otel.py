"""OTLP export of traces and logs, when ``observability.otlp`` is configured.

The OpenTelemetry SDK and exporter are the ``otlp`` extra and are imported only when the
config asks for them. Export runs in the SDK's background threads with short timeouts,
so a collector that is down never blocks the daemon: the daemon keeps logging to stderr
as always, and the exporter drops what it cannot deliver.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from aegis_edge_agent.logs import LOGGER_NAME, EventLog
from aegis_edge_agent.settings import OtlpSettings
from aegis_edge_core import __version__
from aegis_edge_core.wire import stream_pb2

__all__ = ["Telemetry"]

EXPORT_TIMEOUT_SECS = 5.0


class Telemetry:
    """Tool spans nested under the dispatcher's span, and log records, over OTLP/gRPC."""

    def __init__(
        self, settings: OtlpSettings | None, *, log: EventLog, node_id: str, tenant_id: str
    ) -> None:
        self._log = log
        self._tracer: Any = None
        self._providers: list[Any] = []
        self._log_handler: logging.Handler | None = None
        if settings is None:
            return
        try:
            self._setup(settings, node_id=node_id, tenant_id=tenant_id)
        except ImportError as err:
            log.warning(
                "otlp_unavailable",
                error=f"{err}; install the extra: pip install 'aegis-edge[otlp]'",
            )
        except Exception as err:  # exporter misconfigured: keep logging locally
            log.warning("otlp_setup_failed", error=f"{type(err).__name__}: {err}")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def _setup(self, settings: OtlpSettings, *, node_id: str, tenant_id: str) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {
                "service.name": "aegis-edge-daemon",
                "service.version": __version__,
                "aegis.node_id": node_id,
                "aegis.tenant_id": tenant_id,
            }
        )
        headers = dict(settings.headers)
        tracer_provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            insecure=settings.insecure,
            headers=headers or None,
            timeout=EXPORT_TIMEOUT_SECS,
        )
        tracer_provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=1000, export_timeout_millis=5000)
        )
        self._providers.append(tracer_provider)
        self._tracer = tracer_provider.get_tracer("aegis_edge_agent", __version__)
        try:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

            logger_provider = LoggerProvider(resource=resource)
            logger_provider.add_log_record_processor(
                BatchLogRecordProcessor(
                    OTLPLogExporter(
                        endpoint=settings.endpoint,
                        insecure=settings.insecure,
                        headers=headers or None,
                        timeout=EXPORT_TIMEOUT_SECS,
                    ),
                    schedule_delay_millis=1000,
                )
            )
            self._providers.append(logger_provider)
            handler = LoggingHandler(level=logging.INFO, logger_provider=logger_provider)
            logging.getLogger(LOGGER_NAME).addHandler(handler)
            self._log_handler = handler
        except ImportError:
            pass
        self._log.info("otlp_enabled", endpoint=settings.endpoint, insecure=settings.insecure)

    @contextlib.contextmanager
    def tool_span(self, invocation: stream_pb2.CommandInvocation) -> Iterator[Any]:
        """A span for one tool call, child of the span in the invocation's trace context."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry.trace import Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {}
        if invocation.trace.traceparent:
            carrier["traceparent"] = invocation.trace.traceparent
            if invocation.trace.tracestate:
                carrier["tracestate"] = invocation.trace.tracestate
        parent = TraceContextTextMapPropagator().extract(carrier)
        attributes = {
            "aegis.tool": invocation.tool,
            "aegis.command_id": invocation.command_id,
            "fleet_command_id": invocation.fleet_command_id,
        }
        with self._tracer.start_as_current_span(
            f"tool {invocation.tool}",
            context=parent,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as err:
                span.set_status(Status(StatusCode.ERROR, type(err).__name__))
                raise

    def shutdown(self) -> None:
        if self._log_handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(self._log_handler)
        for provider in self._providers:
            with contextlib.suppress(Exception):
                provider.force_flush(2000)
            with contextlib.suppress(Exception):
                provider.shutdown()
