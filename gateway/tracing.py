"""The gateway's spans: one server span per turn, named and attributed by the OpenTelemetry GenAI
semantic conventions plus kvgate's routing attributes, with child spans for the admission wait and
the upstream call, whose W3C `traceparent` the worker (or vLLM) continues.

Off (no OTLP endpoint in the environment), every method returns at its first line: nothing is created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from kvutil.tracing import Tracing

OPERATIONS = {"chat": "chat", "completion": "text_completion"}
_OFF = contextlib.nullcontext()


class TurnTracing:
    def __init__(self, tracing: Tracing, policy: str) -> None:
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.policy = policy

    @contextlib.contextmanager
    def turn(self, headers: Mapping[str, str], kind: str, model: str, max_tokens: int) -> Iterator[None]:
        """The turn's server span, current while the turn is served (continues a client's trace)."""
        assert self.tracer is not None
        operation = OPERATIONS.get(kind, kind)
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "kvgate.route.policy": self.policy,
        }
        with self.tracer.start_as_current_span(
            f"{operation} {model}",
            context=propagate.extract(dict(headers)),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            try:
                yield
            except Exception as exc:
                status = getattr(exc, "status", 500)
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                raise

    def child(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> contextlib.AbstractContextManager[Any]:
        if self.tracer is None:
            return _OFF
        return self.tracer.start_as_current_span(name, kind=kind)

    def annotate(self, attributes: dict[str, Any]) -> None:
        """Attributes on the current span: callers annotate from the turn's own context, outside
        its child spans."""
        if self.tracer is not None:
            trace.get_current_span().set_attributes(attributes)

    def shutdown(self) -> None:
        self.tracing.shutdown()
