"""What the Anthropic Messages and OpenAI Responses endpoints share: a conversation in chat-completions
terms, and the relay that turns a worker's chat answer into another API's wire format.

Each of those endpoints translates its request into the chat messages and tools the gateway's own
`/v1/chat/completions` path takes (`Turn`), so tokenization, routing, sessions, pins and admission are
one code path whatever the API. The worker answers in chat completions; `relay` reads that answer (whole
or as a stream) into neutral deltas and a final `Answer`, and a per-request `Translation` writes them in
its API's shape. Streams go through `gateway.stream_relay`, as the chat-completions ones do: nothing
reaches the client before the worker's first event, so a worker that fails before it can be retried
elsewhere (`Retryable`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.proxy import Outcome, post_attempt, read_usage
from gateway.stream_relay import Retryable, relay_stream
from gateway.upstream import Upstream, UpstreamError, WorkerAnswer
from gateway.validation import Turn

_DONE = b"[DONE]"
PROMPT_TOKENS_HEADER = "x-kvgate-prompt-tokens"
EXPECTED_CACHED_HEADER = "x-kvgate-cached-tokens-expected"

# how the gateway relays one attempt's answer: `gateway.proxy.forward`, or `relay` with a translation
Relay = Callable[..., Awaitable[tuple[web.StreamResponse, Outcome]]]


# --- the conversation, in chat-completions terms


def compact_json(value: Any) -> str:
    """Tool arguments as every API renders them into the prompt (so the three APIs agree)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def function_tool(name: Any, description: Any, parameters: Any, where: str) -> dict[str, Any]:
    """A chat-completions function tool; the same fields, in the same order, from every API."""
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"{where}.name must be a non-empty string", param=f"{where}.name")
    function: dict[str, Any] = {"name": name}
    if description is not None:
        if not isinstance(description, str):
            raise ApiError(400, f"{where}.description must be a string", param=f"{where}.description")
        function["description"] = description
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise ApiError(400, f"{where} parameters must be a JSON schema object", param=where)
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_turn(
    model: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    stream: bool,
    max_tokens: int,
    sampling: dict[str, Any],
) -> Turn:
    """The chat turn the gateway routes and the worker runs (`sampling`: temperature, stop, ...)."""
    if not messages:
        raise ApiError(400, "the conversation is empty", param="messages")
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, **sampling}
    if tools:
        body["tools"] = tools
    if stream:
        body["stream"] = True
    return Turn("chat", body, model, stream, False, max_tokens, messages=messages, tools=tools or None)


# --- the answer


class ToolCall(msgspec.Struct):
    id: str
    name: str
    arguments: str = ""


class TextDelta(msgspec.Struct):
    text: str


class ToolCallStart(msgspec.Struct):
    index: int  # position among this answer's tool calls
    call: ToolCall


class ToolArgumentsDelta(msgspec.Struct):
    index: int
    delta: str


Delta = TextDelta | ToolCallStart | ToolArgumentsDelta


class Answer(msgspec.Struct):
    text: str = ""
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it, when the worker says (vLLM does)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    host_cached_tokens: int = 0


class ChatReader:
    """Reads a worker's chat completion (a whole answer or its chunks) into `Answer` and deltas."""

    def __init__(self) -> None:
        self.answer = Answer()
        self._text: list[str] = []
        self._by_index: dict[int, int] = {}  # the worker's tool call index -> ours

    def whole(self, body: dict[str, Any]) -> Answer:
        choice = _first_choice(body)
        message = found if isinstance(found := choice.get("message"), dict) else {}
        text = message.get("content")
        self._text.append(text if isinstance(text, str) else "")
        for i, call in enumerate(message.get("tool_calls") or []):
            self._call(i, call)
        self._finish(choice, body)
        return self.result()

    def chunk(self, chunk: dict[str, Any]) -> list[Delta]:
        deltas: list[Delta] = []
        choice = _first_choice(chunk)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text.append(text)
                deltas.append(TextDelta(text))
            for position, call in enumerate(delta.get("tool_calls") or []):
                deltas.extend(self._call(position, call))
        self._finish(choice, chunk)
        return deltas

    def result(self) -> Answer:
        self.answer.text = "".join(self._text)
        return self.answer

    def _call(self, position: int, call: Any) -> list[Delta]:
        if not isinstance(call, dict):
            return []
        index = call.get("index", position)
        function = found if isinstance(found := call.get("function"), dict) else {}
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        ours = self._by_index.get(index)
        out: list[Delta] = []
        if ours is None:
            ours = self._by_index[index] = len(self.answer.tool_calls)
            call_id = given if isinstance(given := call.get("id"), str) else f"call_{ours}"
            name = named if isinstance(named := function.get("name"), str) else ""
            self.answer.tool_calls.append(ToolCall(call_id, name))
            out.append(ToolCallStart(ours, self.answer.tool_calls[ours]))
        if arguments:
            self.answer.tool_calls[ours].arguments += arguments
            out.append(ToolArgumentsDelta(ours, arguments))
        return out

    def _finish(self, choice: dict[str, Any], body: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.answer.finish_reason = reason
            stop = choice.get("stop_reason")
            self.answer.stop_sequence = stop if isinstance(stop, str) else None
        usage = body.get("usage")
        if isinstance(usage, dict):
            outcome = Outcome()
            read_usage(usage, outcome)
            self.answer.prompt_tokens = outcome.prompt_tokens
            self.answer.completion_tokens = outcome.completion_tokens
            self.answer.cached_tokens = outcome.cached_tokens
            self.answer.host_cached_tokens = outcome.host_cached_tokens


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


# --- one API's wire format


class Translation(Protocol):
    """One request's answer in one API's shape. `start` is called once, before the first delta."""

    def start(self, prompt_tokens: int, expected_cached: int) -> bytes: ...

    def deltas(self, deltas: list[Delta]) -> bytes: ...

    async def end(self, answer: Answer) -> bytes: ...  # the stream's closing events

    async def whole(self, answer: Answer) -> bytes: ...  # a non-streaming answer's JSON body

    def stream_error(self, message: str) -> bytes: ...  # a worker that failed mid-stream


async def relay(
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
    translation: Translation,
) -> tuple[web.StreamResponse, Outcome]:
    """`gateway.proxy.forward`'s contract, answering in `translation`'s API."""
    del client_wants_usage  # the translation reads usage itself; the worker is always asked for it
    outcome = Outcome()
    resp = await post_attempt(pool, url, payload, stream)
    try:
        if resp.status != 200:
            raise ApiError(resp.status, await _error_message(resp), code="worker_refused")
        reader = ChatReader()
        if not stream:
            response: web.StreamResponse = await _whole(
                resp, headers, outcome, on_first_token, reader, translation
            )
        else:
            stream_headers = {**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
            events = _TranslatedEvents(reader, translation, headers, outcome)
            response = await relay_stream(
                resp, request, stream_headers, metrics, outcome, on_first_token, events
            )
        return response, outcome
    finally:
        resp.release()


async def _error_message(resp: WorkerAnswer) -> str:
    try:
        body = msgspec.json.decode(await resp.read())
    except (UpstreamError, msgspec.DecodeError):
        return f"the worker answered {resp.status}"
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else f"the worker answered {resp.status}"


def _record(answer: Answer, outcome: Outcome) -> None:
    outcome.finish_reason = answer.finish_reason
    outcome.prompt_tokens = answer.prompt_tokens
    outcome.completion_tokens = answer.completion_tokens
    outcome.cached_tokens = answer.cached_tokens
    outcome.host_cached_tokens = answer.host_cached_tokens


async def _whole(
    resp: WorkerAnswer,
    headers: dict[str, str],
    outcome: Outcome,
    on_first_token: Callable[[], None],
    reader: ChatReader,
    translation: Translation,
) -> web.Response:
    try:
        raw = await resp.read()
    except UpstreamError as exc:
        raise Retryable(str(exc)) from exc
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise Retryable("the worker's answer is not JSON") from exc
    if not isinstance(body, dict):
        raise Retryable("the worker's answer is not a JSON object")
    outcome.first_token_at = time.monotonic()
    on_first_token()
    answer = reader.whole(body)
    _record(answer, outcome)
    outcome.ok = True
    data = await translation.whole(answer)
    return web.Response(body=data, headers={**headers, "content-type": "application/json"})


class _TranslatedEvents:
    """A worker's chat-completions stream, read into deltas and written in `translation`'s API."""

    def __init__(
        self, reader: ChatReader, translation: Translation, headers: dict[str, str], outcome: Outcome
    ) -> None:
        self._reader = reader
        self._translation = translation
        self._headers = headers
        self._outcome = outcome
        self._deltas: list[Delta] = []
        self._seen = False  # a chunk (a JSON object) arrived since the last take
        self._done = False

    def read(self, event: bytes) -> bool:
        if not event.startswith(b"data:"):
            return False  # comments and other fields have no counterpart in the client's API
        data = event[5:].strip()
        if data == _DONE:
            self._done = True
            return True
        with contextlib.suppress(msgspec.DecodeError):
            parsed = msgspec.json.decode(data)
            if isinstance(parsed, dict):
                self._seen = True
                self._deltas.extend(self._reader.chunk(parsed))
        return False

    def take(self, first: bool) -> bytes | None:
        if not self._seen and not self._done:
            return None
        self._seen = False
        out = self._start() if first else b""
        deltas, self._deltas = self._deltas, []
        return out + self._translation.deltas(deltas) if deltas else out

    def _start(self) -> bytes:
        return self._translation.start(
            _int_header(self._headers, PROMPT_TOKENS_HEADER),
            _int_header(self._headers, EXPECTED_CACHED_HEADER),
        )

    async def end(self) -> bytes:
        answer = self._reader.result()
        _record(answer, self._outcome)
        return await self._translation.end(answer)

    def error(self, message: str) -> bytes:
        return self._translation.stream_error(message)


def _int_header(headers: dict[str, str], name: str) -> int:
    value = headers.get(name, "")
    return int(value) if value.isdigit() else 0


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with a name, as Anthropic and the Responses API write them."""
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"
