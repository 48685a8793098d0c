"""The gateway's spans: one server span per turn, named and attributed by the OpenTelemetry GenAI
semantic conventions plus kvgate's routing attributes, with child spans for the admission wait and
each upstream call, whose W3C `traceparent` the worker (or vLLM) continues.

A turn notes its ids (the client's trace, or a new one; the sampler's decision, as
OTEL_TRACES_SAMPLER says), times and attributes as it runs, and its spans are built and handed to the
exporter once it has answered, off the request's path: a live SDK span costs tens of microseconds
each, and three per request were most of a millisecond on a loaded machine. Off (no OTLP endpoint in
the environment), nothing is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context

from kvutil.tracing import Tracing

OPERATIONS = {"chat": "chat", "completion": "text_completion"}
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_TRACESTATE = re.compile(r"^[\x20-\x7e]{1,512}$")
_OFF = contextlib.nullcontext()


class _Child:
    """A child span while it runs (a context manager, cheaper than a generator-based one)."""

    __slots__ = ("end_ns", "kind", "name", "span_id", "start_ns", "turn")

    def __init__(self, turn: TurnTrace, name: str, kind: SpanKind) -> None:
        self.turn = turn
        self.name = name
        self.kind = kind
        self.span_id = 0
        self.start_ns = self.end_ns = 0

    def __enter__(self) -> None:
        self.span_id = random.getrandbits(64)
        self.start_ns = time.time_ns()
        self.turn.children.append(self)

    def __exit__(self, *_exc: object) -> None:
        self.end_ns = time.time_ns()


class TurnTrace:
    """One turn's trace as it runs: ids, times and attributes, nothing of the SDK's yet."""

    __slots__ = ("attributes", "children", "end_ns", "error", "name", "parent", "sampled", "span_id",
                 "start_ns", "trace_id", "tracestate")  # fmt: skip

    def __init__(self, name: str, headers: Mapping[str, str]) -> None:
        self.name = name
        self.parent: SpanContext | None = None
        self.trace_id = 0
        match = _TRACEPARENT.match(headers.get("traceparent", ""))
        if match and int(match[1], 16) and int(match[2], 16):
            flags = TraceFlags(int(match[3], 16))
            self.parent = SpanContext(int(match[1], 16), int(match[2], 16), is_remote=True, trace_flags=flags)
            self.trace_id = self.parent.trace_id
        state = headers.get("tracestate", "")
        self.tracestate = state if _TRACESTATE.match(state) else ""
        self.trace_id = self.trace_id or random.getrandbits(128)
        self.span_id = random.getrandbits(64)
        self.sampled = True
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.attributes: dict[str, Any] = {}
        self.children: list[_Child] = []
        self.error: str | None = None

    def upstream_headers(self) -> str:
        """The traceparent (and the client's tracestate) for the upstream call in progress."""
        span_id = self.children[-1].span_id if self.children else self.span_id
        flags = "01" if self.sampled else "00"
        head = f"traceparent: 00-{self.trace_id:032x}-{span_id:016x}-{flags}\r\n"
        return head + (f"tracestate: {self.tracestate}\r\n" if self.tracestate else "")


_current: ContextVar[TurnTrace | None] = ContextVar("kvgate_turn_trace", default=None)


class _TurnScope:
    """The turn's trace is the current one inside; on the way out it is queued for export."""

    __slots__ = ("token", "tracing", "turn")

    def __init__(self, tracing: TurnTracing, turn: TurnTrace) -> None:
        self.tracing = tracing
        self.turn = turn
        self.token: Any = None

    def __enter__(self) -> None:
        self.token = _current.set(self.turn)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        turn = self.turn
        _current.reset(self.token)
        turn.end_ns = time.time_ns()
        if isinstance(exc, Exception):
            turn.attributes["error.type"] = type(exc).__name__
            turn.attributes["http.response.status_code"] = getattr(exc, "status", 500)
            turn.error = str(exc)[:200]
        if turn.sampled:
            asyncio.get_running_loop().call_soon(self.tracing.export, turn)


class TurnTracing:
    def __init__(self, tracing: Tracing, policy: str) -> None:
        self.tracing = tracing
        self.enabled = tracing.tracer is not None
        self.policy = policy
        sampler = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        self._parent_based_always_on = sampler == "parentbased_always_on"

    def turn(self, headers: Mapping[str, str], kind: str, model: str, max_tokens: int) -> _TurnScope:
        """Note the turn while it is served (continuing a client's trace); export it afterwards."""
        operation = OPERATIONS.get(kind, kind)
        turn = TurnTrace(f"{operation} {model}", headers)
        turn.sampled = self._sampled(turn)
        turn.attributes.update(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": max_tokens,
                "kvgate.route.policy": self.policy,
            }
        )
        return _TurnScope(self, turn)

    def _sampled(self, turn: TurnTrace) -> bool:
        if self._parent_based_always_on:  # the default sampler, decided without its machinery
            return turn.parent is None or turn.parent.trace_flags.sampled
        parent = None if turn.parent is None else set_span_in_context(NonRecordingSpan(turn.parent))
        result = self.tracing.sampler.should_sample(parent, turn.trace_id, turn.name, SpanKind.SERVER)
        return result.decision.is_sampled()

    def child(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> contextlib.AbstractContextManager[Any]:
        turn = _current.get()
        return _OFF if turn is None else _Child(turn, name, kind)

    def annotate(self, attributes: dict[str, Any]) -> None:
        turn = _current.get()
        if turn is not None:
            turn.attributes.update(attributes)

    def upstream_headers(self) -> str:
        turn = _current.get()
        return "" if turn is None else turn.upstream_headers()

    def export(self, turn: TurnTrace) -> None:
        flags = TraceFlags(TraceFlags.SAMPLED)
        server = SpanContext(turn.trace_id, turn.span_id, is_remote=False, trace_flags=flags)
        export = self.tracing.finished_span
        export(turn.name, server, turn.parent, SpanKind.SERVER, turn.start_ns, turn.end_ns, turn.attributes,
               turn.error)  # fmt: skip
        for child in turn.children:
            context = SpanContext(turn.trace_id, child.span_id, is_remote=False, trace_flags=flags)
            export(child.name, context, server, child.kind, child.start_ns, child.end_ns or turn.end_ns, {})

    def shutdown(self) -> None:
        self.tracing.shutdown()
