"""A lean streaming OpenAI chat client on aiohttp that times every token.

The `openai` package costs too much per request to drive hundreds of streams a second from one
process; this one encodes the body with msgspec, reads the socket in chunks, splits Server-Sent Events
itself and decodes only the fields it measures.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import msgspec

from loadgen.workloads import Turn

SESSION_HEADER = "x-session-id"
TOOL_CALL_HEADER = "x-kvgate-tool-call"
WORKER_HEADER = "x-kvgate-worker"  # a kvgate gateway names the worker it picked
MAX_ERROR_BODY = 4096
MAX_EVENT_BYTES = 16 << 20  # a server that never ends an event must not grow us without bound


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None  # /v1/completions
    finish_reason: str | None = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    host_cached_tokens: int = 0  # kvgate workers: the part of cached_tokens onboarded from host memory


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


class Outcome(msgspec.Struct):
    """What one request measured; times are `time.perf_counter()` seconds."""

    start: float
    end: float = 0.0
    first_token: float | None = None
    status: int = 0
    error: str | None = None
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    host_cached_tokens: int = 0
    finish_reason: str | None = None
    worker: str | None = None  # the kvgate worker that served it (x-kvgate-worker); None elsewhere
    itl: list[float] = []  # gaps between successive token events

    @property
    def ok(self) -> bool:
        return self.error is None


class StreamError(Exception):
    pass


class ChatStream:
    """A chat-completions answer's SSE, parsed as it arrives into an Outcome (the other APIs' streams
    in `loadgen.apis` read their own events)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done = False
        self._buffer = b""
        self._pieces: list[str] = []
        self._events = 0
        self._last: float | None = None

    def feed(self, data: bytes, now: float) -> None:
        buffer = self._buffer + data
        held = b""
        if b"\r" in buffer:  # CRLF or CR line ends; a trailing CR may be half of a CRLF: keep it back
            if buffer.endswith(b"\r"):
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, rest = buffer.split(b"\n\n")
        if len(rest) > MAX_EVENT_BYTES:
            raise StreamError(f"an SSE event exceeds {MAX_EVENT_BYTES} bytes")
        self._buffer = rest + held
        for event in events:
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        data = event_data(event)
        if data is None:
            return  # comments (": ping") and events without data
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = _chunk_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise StreamError(f"bad SSE data: {exc}") from exc
        if chunk.error is not None:
            message = chunk.error.get("message") if isinstance(chunk.error, dict) else chunk.error
            raise StreamError(f"error event: {message}")
        produced = False
        for choice in chunk.choices:
            delta = choice.delta
            piece = choice.text if delta is None else delta.content
            if piece:
                self._pieces.append(piece)
                produced = True
            elif delta is not None and (delta.reasoning_content or delta.tool_calls):
                produced = True
            if choice.finish_reason:
                self.outcome.finish_reason = choice.finish_reason
        if produced:
            self._token_event(now)
        if chunk.usage is not None:
            usage = chunk.usage
            self.outcome.prompt_tokens = usage.prompt_tokens
            self.outcome.output_tokens = usage.completion_tokens
            details = usage.prompt_tokens_details
            self.outcome.cached_tokens = details.cached_tokens if details is not None else None
            self.outcome.host_cached_tokens = details.host_cached_tokens if details is not None else 0

    def _token_event(self, now: float) -> None:
        """An event that carried tokens: the first sets the TTFT, each later one an inter-token gap."""
        self._events += 1
        if self._last is None:
            self.outcome.first_token = now
        else:
            self.outcome.itl.append(now - self._last)
        self._last = now

    def finish(self) -> None:
        if self._buffer.strip():
            self._event(self._buffer, time.perf_counter())
            self._buffer = b""
        self.outcome.text = "".join(self._pieces)
        if not self.outcome.output_tokens:
            self.outcome.output_tokens = self._events  # server sent no usage: one event, one token


def event_data(event: bytes) -> bytes | None:
    """An SSE event's data (its `data:` lines joined), None when it has none."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _error_message(body: bytes) -> str:
    try:
        error = msgspec.json.decode(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (msgspec.DecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", errors="replace").strip() or "no body"


class StreamClient:
    """POSTs turns to `{url}/chat/completions` with `stream: true` and measures them."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 512,
        session_header: bool = True,
        extra_body: dict[str, Any] | None = None,
        api: Any = None,
    ) -> None:
        """`api`: a `loadgen.apis.ApiFormat` (Anthropic Messages, OpenAI Responses); None: chat."""
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.api = api
        self.endpoint = base + (api.path if api is not None else "/chat/completions")
        self.model = model
        self.session_header = session_header
        self.extra_body = extra_body or {}
        self._headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamClient:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._http = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    def body(self, turn: Turn) -> bytes:
        if self.api is not None:
            return _encoder.encode({**self.api.body(self.model, turn), **self.extra_body})
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": turn.messages,
            "max_tokens": turn.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if turn.tools:
            payload["tools"] = turn.tools
        payload.update(self.extra_body)
        return _encoder.encode(payload)

    def headers(self, turn: Turn, session_id: str) -> dict[str, str]:
        if not self.session_header:
            return self._headers
        headers = {**self._headers, SESSION_HEADER: session_id}
        if turn.tool_result:
            headers[TOOL_CALL_HEADER] = "pending"
        return headers

    async def send(self, turn: Turn, session_id: str, outcome: Outcome | None = None) -> Outcome:
        """Sends the turn and streams its answer into `outcome` (a new one by default): a caller that
        cancels the send still holds what was measured so far (its first token, if it came)."""
        assert self._http is not None, "use StreamClient as an async context manager"
        if outcome is None:
            outcome = Outcome(start=0.0)
        outcome.start = time.perf_counter()
        stream = ChatStream(outcome) if self.api is None else self.api.stream(outcome)
        try:
            async with self._http.post(
                self.endpoint, data=self.body(turn), headers=self.headers(turn, session_id)
            ) as response:
                outcome.status = response.status
                outcome.worker = response.headers.get(WORKER_HEADER)
                if response.status != 200:
                    body = await response.content.read(MAX_ERROR_BODY)
                    outcome.error = f"HTTP {response.status}: {_error_message(body)}"
                else:
                    async for data in response.content.iter_any():
                        stream.feed(data, time.perf_counter())
                        if stream.done:
                            break
                    stream.finish()
                    if not stream.done:
                        outcome.error = "stream ended without [DONE]"
        except StreamError as exc:
            outcome.error = str(exc)
        except TimeoutError:
            outcome.error = "timeout"
        except aiohttp.ClientError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.end = time.perf_counter()
        return outcome
