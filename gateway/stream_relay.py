"""The loop that relays a worker's server-sent events to the client, whatever API the client speaks.

The worker always answers in chat-completions SSE. The loop splits its chunks into events, hands them
to a `StreamEvents` (which says what the client gets for them, and which event was the last), and owns
what every API shares: nothing is sent before the worker's first event (so a worker that fails before
it can be retried elsewhere: `Retryable`), the events that arrived together leave in one write, the
inter-token latency is observed per write, and a worker that fails or ends early after the first
event ends the client's stream with an error event in the client's API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from gateway.metrics import GatewayMetrics
from gateway.upstream import UpstreamError, WorkerAnswer, drain

# an event this long without its end is a broken worker, not a reason to hold its bytes (the longest
# real ones, a final chunk with usage and token ids, are a few hundred KB)
MAX_EVENT_BYTES = 16 * 1024 * 1024
# an event of comment lines alone is a worker's keepalive (engines/loop.py): it restarted the read's
# timeout by arriving, and is no event of the answer's (not a first token, nothing for the client)
COLON = ord(":")


class _EventStream(web.StreamResponse):
    """A stream whose head leaves with its first events, in one write: a `StreamResponse` sends its
    head alone at `prepare` (a system call of its own); aiohttp's `Response` buffers it so. The relay
    writes right after `prepare`, so the head is not delayed."""

    _send_headers_immediately = False  # aiohttp >= 3.11; older versions send it at once, as before


class Retryable(Exception):
    """The worker failed before anything reached the client: another worker may take the turn."""


class Outcome(Protocol):
    ok: bool
    first_token_at: float | None


class StreamEvents(Protocol):
    """What the client gets for a worker's events, in one API's wire format."""

    def read(self, event: bytes) -> bool:
        """Take one event (`...\\n\\n` included); True when it was the worker's last (`[DONE]`)."""
        ...

    def take(self, first: bool) -> bytes | None:
        """The bytes for the events read since the last take (`first`: the first bytes the client
        gets, which open its API's stream); None when none of them counts as an event for the
        client: nothing is written, and before the first one nothing is sent."""
        ...

    async def end(self) -> bytes:
        """What goes after the last event's bytes (once, when the worker's stream was complete)."""
        ...

    def error(self, message: str) -> bytes:
        """The event that ends the client's stream when the worker failed after its first event."""
        ...


async def relay_stream(
    resp: WorkerAnswer,
    request: web.Request,
    headers: dict[str, str],
    metrics: GatewayMetrics,
    outcome: Outcome,
    on_first_token: Callable[[], None],
    events: StreamEvents,
) -> web.StreamResponse:
    """Relay `resp`'s event stream to the client with `headers`; `outcome.ok` when it ended in [DONE]."""
    response: web.StreamResponse | None = None
    buffer = b""
    last_event_at = 0.0
    done = False
    # a read at a time: `iter_chunks` would be left suspended at [DONE], where the relay stops, and
    # costs a generator and its close (`aclosing`) every stream
    while not done:
        try:
            chunk = await resp.read_chunk()
        except UpstreamError as exc:
            if response is None:
                raise Retryable(str(exc)) from exc
            return await _fail(response, metrics, events.error(f"worker failed mid-stream: {exc}"))
        if not chunk:
            break
        buffer, done = _read_events(buffer + chunk, events)
        if len(buffer) > MAX_EVENT_BYTES:
            failure = f"worker sent over {MAX_EVENT_BYTES} bytes without an event's end"
            if response is None:
                raise Retryable(failure)
            return await _fail(response, metrics, events.error(failure))
        out = events.take(response is None)
        if out is None:
            if not done:
                continue
            out = b""
        now = time.monotonic()
        opened = response is None
        if response is None:
            response = await _open(resp, request, headers)
            outcome.first_token_at = now
            on_first_token()
        else:
            metrics.itl.observe(now - last_event_at)
        last_event_at = now
        if done:  # the last events and the stream's end leave in one write (one system call)
            outcome.ok = True
            await response.write_eof(out + await events.end())
            await drain(resp)
            return response
        if out or opened:  # the head goes out now, with the events if any
            await response.write(out)
    if response is None:
        raise Retryable("worker ended the stream before its first event")
    return await _fail(response, metrics, events.error("worker ended the stream without [DONE]"))


def _read_events(buffer: bytes, events: StreamEvents) -> tuple[bytes, bool]:
    """Hand each whole event in `buffer` to `events`, up to the worker's last, but keepalives: what is
    left of the buffer, and whether the last event was among them."""
    start = 0  # where the next event begins: the buffer is cut once, not after every event
    while (blank := buffer.find(b"\n\n", start)) >= 0:
        end = blank + 2
        if buffer[start] == COLON and buffer.find(b"\ndata", start, end) < 0:
            start = end  # a keepalive: comments alone
            continue
        if events.read(buffer[start:end]):
            return buffer[end:], True
        start = end
    return buffer[start:], False


async def _open(resp: WorkerAnswer, request: web.Request, headers: dict[str, str]) -> _EventStream:
    """The client's stream, its head about to leave with the first events: from here on the worker
    answers this client (a failure is no longer retried elsewhere)."""
    response = _EventStream(headers=headers)
    resp.commit()
    await response.prepare(request)
    return response


async def _fail(response: web.StreamResponse, metrics: GatewayMetrics, event: bytes) -> web.StreamResponse:
    metrics.stream_errors.inc()
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionError:
        pass
    return response
