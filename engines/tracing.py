"""A worker's spans for one request, made when it ends from the times the worker noted: a server span
continuing the caller's W3C `traceparent`, with children for the queue wait (arrival to the first
engine step that computed it), the prefill (that step to the first token) and the decode (first token
to the last). Times are the event loop's clock, placed on the wall clock once per request."""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Tracer, set_span_in_context
from opentelemetry.util.types import AttributeValue


class RequestTimes:
    __slots__ = ("arrived", "finished", "first_step", "first_token")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.first_step: float | None = None
        self.first_token: float | None = None
        self.finished = arrived


def record_request(
    tracer: Tracer,
    headers: Mapping[str, str],
    name: str,
    times: RequestTimes,
    now: float,
    attributes: dict[str, AttributeValue],
) -> None:
    """The request's spans; `now` is the event loop's time at this call (to place its times)."""
    offset_ns = time.time_ns() - int(now * 1e9)

    def wall(t: float) -> int:
        return offset_ns + int(t * 1e9)

    server = tracer.start_span(
        name,
        context=extract(dict(headers)),
        kind=SpanKind.SERVER,
        attributes=attributes,
        start_time=wall(times.arrived),
    )
    context = set_span_in_context(server)
    first_step = times.first_step if times.first_step is not None else times.finished
    first_token = times.first_token if times.first_token is not None else times.finished
    phases = (
        ("kvgate.worker.queue", times.arrived, first_step),
        ("kvgate.worker.prefill", first_step, max(first_step, first_token)),
        ("kvgate.worker.decode", max(first_step, first_token), times.finished),
    )
    for phase, start, end in phases:
        tracer.start_span(phase, context=context, start_time=wall(start)).end(end_time=wall(end))
    server.end(end_time=wall(times.finished))
