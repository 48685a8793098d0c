"""Forwarding one attempt of a turn to one worker, and relaying its answer to the client.

Streams are relayed event by event, each written (flushed) as it arrives, bytes untouched when the
client asked for usage. The gateway always asks the worker for it (its metrics and sessions need the
cached tokens); when the client did not, the final usage chunk is read as it passes and dropped, and
the other chunks lose their `"usage": null` member, so the client sees the stream the worker (or
OpenAI) would have sent it. Nothing is sent to the client before the worker's first event, so a
worker that fails before that can be retried elsewhere (`Retryable`); a failure after it ends the
stream with an error event.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from gateway.errors import sse_error_event
from gateway.metrics import GatewayMetrics
from gateway.upstream import UpstreamError, UpstreamPool, UpstreamResponse

_DONE = b"[DONE]"
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
SERVED_BY_HEADER = "x-kvgate-served-by"  # a worker's id, as `kvgate worker` sends it (engines/worker.py)


class Retryable(Exception):
    """The worker failed before anything reached the client: another worker may take the turn."""


class Outcome(msgspec.Struct):
    ok: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    host_cached_tokens: int = 0  # of the cached, those onboarded from the worker's host tier
    first_token_at: float | None = None


def read_usage(usage: Any, outcome: Outcome) -> None:
    if not isinstance(usage, dict):
        return
    outcome.prompt_tokens = _int(usage.get("prompt_tokens"))
    outcome.completion_tokens = _int(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        outcome.cached_tokens = _int(details.get("cached_tokens"))
        # kvgate workers' extension: absent (0) when no host tier served the turn, or from other engines
        outcome.host_cached_tokens = min(_int(details.get("host_cached_tokens")), outcome.cached_tokens)


def _int(value: Any) -> int:
    """A token count from the worker (untrusted): a non-negative int, else 0 (a counter never goes down)."""
    return max(0, value) if isinstance(value, int) and not isinstance(value, bool) else 0


class _Answer(msgspec.Struct):
    """The two fields of a whole answer the gateway reads; the rest is skipped, not built."""

    usage: Any | msgspec.UnsetType = msgspec.UNSET  # UNSET: no usage member; None: `"usage": null`
    choices: Any = None


def _finish_reason(choices: Any) -> str | None:
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None


_ANSWER = msgspec.json.Decoder(_Answer)


async def forward(
    pool: UpstreamPool,
    url: str,
    payload: bytes,
    *,
    request: web.Request,
    stream: bool,
    client_wants_usage: bool,
    headers: dict[str, str],
    metrics: GatewayMetrics,
    on_first_token: Callable[[], None],
) -> tuple[web.StreamResponse, Outcome]:
    """One attempt. Raises `Retryable` when nothing has been sent to the client yet."""
    outcome = Outcome()
    try:
        # a worker streams its head at once; none within the first-byte timeout: hung, try another
        resp = await pool.post(url, payload, pool.first_byte_timeout_s if stream else None)
    except UpstreamError as exc:
        raise Retryable(str(exc)) from exc
    try:
        if resp.status in _RETRYABLE_STATUS:
            raise Retryable(f"worker answered {resp.status}")
        if resp.status != 200 or not stream:
            response = await _whole(resp, headers, outcome, on_first_token)
        else:
            response = await _relay(
                resp, request, headers, client_wants_usage, metrics, outcome, on_first_token
            )
            if outcome.ok and not resp.complete:
                with contextlib.suppress(UpstreamError):
                    async for _ in resp.iter_chunks():  # the chunk terminator after [DONE]
                        pass
        return response, outcome
    finally:
        # back to the pool when read to the end; a half-read response is closed, which is what
        # cancels the worker's sequence when the client left
        resp.release()


async def _whole(
    resp: UpstreamResponse,
    headers: dict[str, str],
    outcome: Outcome,
    on_first_token: Callable[[], None],
) -> web.Response:
    try:
        body = await resp.read()
    except UpstreamError as exc:
        raise Retryable(str(exc)) from exc
    if resp.status == 200:
        outcome.first_token_at = time.monotonic()
        on_first_token()
        outcome.ok = True
        try:
            answer = _ANSWER.decode(body)
        except msgspec.DecodeError:  # also not an object (a ValidationError)
            answer = None
        if answer is not None:
            read_usage(answer.usage, outcome)
            outcome.finish_reason = _finish_reason(answer.choices)
    return web.Response(
        status=resp.status,
        body=body,
        headers={
            **headers,
            **_served_by(resp),
            "content-type": resp.headers.get("content-type", "application/json"),
        },
    )


async def _relay(
    resp: UpstreamResponse,
    request: web.Request,
    headers: dict[str, str],
    client_wants_usage: bool,
    metrics: GatewayMetrics,
    outcome: Outcome,
    on_first_token: Callable[[], None],
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    buffer = b""
    last_event_at = 0.0
    done = False
    chunks = resp.iter_chunks()
    while not done:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except UpstreamError as exc:
            if response is None:
                raise Retryable(str(exc)) from exc
            return await _fail(response, metrics, f"worker failed mid-stream: {exc}")
        buffer += chunk
        out: list[bytes] = []  # the events that arrived together leave together: one write, one flush
        while not done:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            sent, done = _inspect(event, client_wants_usage, outcome)
            if sent is not None:
                out.append(sent)
        if not out:
            continue
        now = time.monotonic()
        if response is None:
            response = web.StreamResponse(
                headers={
                    **headers,
                    **_served_by(resp),
                    "content-type": "text/event-stream",
                    "cache-control": "no-cache",
                }
            )
            resp.commit()
            await response.prepare(request)
            outcome.first_token_at = now
            on_first_token()
        else:
            metrics.itl.observe(now - last_event_at)
        last_event_at = now
        batch = out[0] if len(out) == 1 else b"".join(out)
        if done:  # the last events and the stream's end leave in one write (one system call)
            outcome.ok = True
            await response.write_eof(batch)
            return response
        await response.write(batch)
    if response is None:
        raise Retryable("worker ended the stream before its first event")
    return await _fail(response, metrics, "worker ended the stream without [DONE]")


def _served_by(resp: UpstreamResponse) -> dict[str, str]:
    """The worker's own word on who served the request, passed on (`kvgate worker` sends its id); a
    value no worker id could be is dropped."""
    worker = resp.headers.get(SERVED_BY_HEADER, "")
    return {SERVED_BY_HEADER: worker} if 0 < len(worker) <= 256 and worker.isprintable() else {}


def _inspect(event: bytes, client_wants_usage: bool, outcome: Outcome) -> tuple[bytes | None, bool]:
    """(what to write to the client, None for nothing; is it the last event?)"""
    if not event.startswith(b"data:"):
        return event, False  # comments and other fields pass through
    data = event[5:].strip()
    if data == _DONE:
        return event, True
    try:
        chunk = _ANSWER.decode(data)
    except msgspec.DecodeError:  # also not an object (a ValidationError)
        return event, False
    reason = _finish_reason(chunk.choices)
    if reason is not None:
        outcome.finish_reason = reason
    if chunk.usage is None and not client_wants_usage:
        return drop_null_usage(event), False
    if chunk.usage:
        read_usage(chunk.usage, outcome)
        if chunk.choices == [] and not client_wants_usage:
            return None, False
    return event, False


# The member last, as pydantic, msgspec and our workers write it (compact), and as json.dumps does.
_COMPACT_TAIL = b',"usage":null}\n\n'
_OTHER_TAILS = (b', "usage": null}\n\n', b',"usage": null}\n\n')
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_WHITESPACE = b" \t\r\n"


def drop_null_usage(event: bytes) -> bytes:
    """`event` (`data: {json}\n\n`) without the top-level `"usage": null` member of its JSON object.

    Exact at bytes level: the member is cut with one separating comma and the rest is left as the
    worker wrote it. The caller decoded the chunk and saw that member, so the JSON is valid: a member
    closing the object needs no further check (a quote inside a string is escaped, so the pattern
    cannot start inside one); one elsewhere is cut only if the result no longer has a top-level
    usage (it was not a nested object's). Anything else is decoded and encoded again.
    """
    if event.endswith(_COMPACT_TAIL):  # the hot path: one compare, one copy
        return event[: -len(_COMPACT_TAIL)] + b"}\n\n"
    for tail in _OTHER_TAILS:
        if event.endswith(tail):
            return event[: -len(tail)] + b"}\n\n"
    for match in _NULL_USAGE.finditer(event):
        edited = _cut_member(event, match.start(), match.end())
        if edited is not None and _top_level_usage(edited) is msgspec.UNSET:
            return edited
    return _reencode_without_usage(event)


def _cut_member(event: bytes, start: int, end: int) -> bytes | None:
    head = event[:start].rstrip(_WHITESPACE)
    if head.endswith(b","):  # a member before it: take the comma before
        return head[:-1] + event[end:]
    if not head.endswith(b"{"):
        return None
    rest = event[end:].lstrip(_WHITESPACE)
    if rest.startswith(b","):  # the first member: take the comma after
        return head + rest[1:].lstrip(_WHITESPACE)
    return head + rest  # the only member


def _top_level_usage(event: bytes) -> Any:
    try:
        return _ANSWER.decode(event[5:].strip()).usage
    except msgspec.DecodeError:
        return None


def _reencode_without_usage(event: bytes) -> bytes:
    try:
        chunk = msgspec.json.decode(event[5:].strip())
    except msgspec.DecodeError:
        return event
    if isinstance(chunk, dict):
        chunk.pop("usage", None)
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


async def _fail(response: web.StreamResponse, metrics: GatewayMetrics, message: str) -> web.StreamResponse:
    metrics.stream_errors.inc()
    try:
        await response.write(sse_error_event(502, message, "upstream_failed"))
        await response.write_eof()
    except ConnectionError:
        pass
    return response
