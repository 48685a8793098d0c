"""OpenTelemetry traces, configured by the standard `OTEL_*` environment variables.

On only when an OTLP endpoint is named (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and neither `OTEL_SDK_DISABLED=true` nor
`OTEL_TRACES_EXPORTER=none` says otherwise; off, callers get None and create nothing. The SDK reads
the rest itself: `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (the resource),
`OTEL_TRACES_SAMPLER` / `_ARG` (the sampler), `OTEL_EXPORTER_OTLP_*` (endpoint, headers, timeout),
`OTEL_BSP_*` (batching). Spans leave over OTLP/HTTP (protobuf) in a background thread. No global
provider is installed: each process owns its provider and shuts it down (flushing) when it stops.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, Tracer

_UNSET = Status(StatusCode.UNSET)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_enabled(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


class Tracing:
    """A process's tracer provider (when tracing is on), its tracer, and what `finished_span` needs to
    hand a span made after the fact straight to the exporting processor."""

    def __init__(self, service_name: str, scope: str) -> None:
        self.tracer: Tracer | None = None
        self.sampler: Any = None
        self._provider: Any = None
        self._processor: Any = None
        self._scope: Any = None
        self._span_type: Any = None
        if not tracing_enabled():
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        # OTEL_SERVICE_NAME wins over our default; Resource.create reads it and OTEL_RESOURCE_ATTRIBUTES
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        self._processor = BatchSpanProcessor(OTLPSpanExporter())
        provider.add_span_processor(self._processor)
        self._provider = provider
        self._scope = InstrumentationScope(scope)
        self._span_type = ReadableSpan
        self.sampler = provider.sampler
        self.tracer = provider.get_tracer(scope)

    def finished_span(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        error: str | None = None,
    ) -> None:
        """Export a span recorded after the fact (ids chosen up front, times noted as it ran): much
        less work than a live SDK span, and none of it on a request's path."""
        status = Status(StatusCode.ERROR, error) if error else _UNSET
        span = self._span_type(
            name,
            context=context,
            parent=parent,
            resource=self._provider.resource,
            attributes=attributes,
            kind=kind,
            status=status,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self._scope,
        )
        self._processor.on_end(span)

    def shutdown(self) -> None:
        """Flush what is queued and stop the exporter (bounded by OTEL_BSP_EXPORT_TIMEOUT)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
