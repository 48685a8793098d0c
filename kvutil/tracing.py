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

from opentelemetry.trace import Tracer

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_enabled(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


class Tracing:
    """A process's tracer provider (when tracing is on) and its tracer."""

    def __init__(self, service_name: str, scope: str) -> None:
        self.tracer: Tracer | None = None
        self._provider = None
        if not tracing_enabled():
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # OTEL_SERVICE_NAME wins over our default; Resource.create reads it and OTEL_RESOURCE_ATTRIBUTES
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._provider = provider
        self.tracer = provider.get_tracer(scope)

    def shutdown(self) -> None:
        """Flush what is queued and stop the exporter (bounded by OTEL_BSP_EXPORT_TIMEOUT)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
