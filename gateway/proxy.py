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

import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from gateway.errors import sse_error_event
from gateway.metrics import GatewayMetrics
from gateway.stream_relay import Retryable, relay_stream
from gateway.upstream import Upstream, UpstreamError, WorkerAnswer

_DONE = b"[DONE]"
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
SERVED_BY_HEADER = "x-kvgate-served-by"  # a worker's id, as `kvgate worker` sends it (engines/worker.py)


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


async def post_attempt(pool: Upstream, url: str, payload: bytes, stream: bool) -> WorkerAnswer:
    """Posts one attempt to a worker and reads its head. Raises `Retryable` when the worker cannot be
    reached or answers a status another worker may not (429, 5xx); the caller releases the response."""
    try:
        # a worker streams its head at once; none within the first-byte timeout: hung, try another
        resp = await pool.post(url, payload, pool.first_byte_timeout_s if stream else None)
    except UpstreamError as exc:
        raise Retryable(str(exc)) from exc
    if resp.status in _RETRYABLE_STATUS:
        resp.release()
        raise Retryable(f"worker answered {resp.status}")
    return resp


async def forward(
    pool: Upstream,
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
    resp = await post_attempt(pool, url, payload, stream)
    try:
        if resp.status != 200 or not stream:
            response: web.StreamResponse = await _whole(resp, headers, outcome, on_first_token)
        else:
            stream_headers = {
                **headers,
                **_served_by(resp),
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
            }
            events = _ChatEvents(client_wants_usage, outcome)
            response = await relay_stream(
                resp, request, stream_headers, metrics, outcome, on_first_token, events
            )
        return response, outcome
    finally:
        # back to the pool when read to the end; a half-read response is closed, which is what
        # cancels the worker's sequence when the client left
        resp.release()


async def _whole(
    resp: WorkerAnswer,
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


class _ChatEvents:
    """A chat-completions stream relayed as it is: usage read as it passes, and dropped when the
    client did not ask for it."""

    def __init__(self, client_wants_usage: bool, outcome: Outcome) -> None:
        self._client_wants_usage = client_wants_usage
        self._outcome = outcome
        self._out: list[bytes] = []

    def read(self, event: bytes) -> bool:
        if _carries_nothing(event):  # most of a stream: passed on without a decode
            self._out.append(event if self._client_wants_usage else event[: -len(_COMPACT_TAIL)] + b"}\n\n")
            return False
        sent, done = _inspect(event, self._client_wants_usage, self._outcome)
        if sent is not None:
            self._out.append(sent)
        return done

    def take(self, first: bool) -> bytes | None:
        out = self._out
        if not out:
            return None
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    async def end(self) -> bytes:
        return b""

    def error(self, message: str) -> bytes:
        return sse_error_event(502, message, "upstream_failed")


def _served_by(resp: WorkerAnswer) -> dict[str, str]:
    """The worker's own word on who served the request, passed on (`kvgate worker` sends its id); a
    value no worker id could be is dropped."""
    worker = resp.headers.get(SERVED_BY_HEADER, "")
    return {SERVED_BY_HEADER: worker} if 0 < len(worker) <= 256 and worker.isprintable() else {}


_FINISH_REASON = b'"finish_reason"'


def _carries_nothing(event: bytes) -> bool:
    """Whether a chunk has neither a finish reason nor usage, told from its bytes, as our workers, vLLM
    and OpenAI write a token's chunk: one `data:` line ending in `,"usage":null}` (compact, usage its
    last member) whose only `"finish_reason"` is null. These scans cost half of a decode and its
    checks; most of a stream's chunks are such (docs/EXPERIMENTS.md, "Gateway CPU, seventh pass").

    Exact for a chunk that is JSON: the line's last `}` closes the object (JSON has no raw newline),
    so its last member is a null usage (`"usage"` inside a string would have escaped quotes); a key
    spelled `"finish_reason"` elsewhere would be a second one. A line that is not JSON but ends so
    loses its null usage as a JSON chunk would.
    """
    if not (event.endswith(_COMPACT_TAIL) and event.startswith(b"data:")):
        return False
    key = event.find(_FINISH_REASON)
    return (
        key >= 0
        and event.startswith(b":null", key + len(_FINISH_REASON))
        and event.find(_FINISH_REASON, key + 1) < 0  # the only one
        and event.find(b"\n") == len(event) - 2  # one line
    )


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
