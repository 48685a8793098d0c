"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), as Claude Code and the
Claude Agent SDK speak it, served through the gateway's chat path.

A request becomes chat messages (`system` first; `tool_use` blocks become the assistant's tool calls,
`tool_result` blocks `tool` messages), so it renders to the prompt the same conversation would have as a
chat completion. What the engines cannot honour is accepted and ignored, not refused: `thinking`,
`context_management`, `output_config`, `container`, `mcp_servers`, `service_tier`, `cache_control`
marks, `anthropic-beta` headers, server tools, and assistant `thinking` blocks. Images and documents
are refused (400): the engines read text only.

Claude Code puts a billing line that changes on every call at the head of its system prompt
(`x-anthropic-billing-header: cc_version=...; cch=...;`); left in, no two prompts would share a
prefix. It is removed before tokenization (`strip_billing_line`, on by default), as Dynamo's
`--strip-anthropic-preamble` does. Its `x-claude-code-session-id` names the whole CLI session, main
thread and Task-tool sub-agents alike: each conversation in it (told apart by its first user message)
becomes a child session `<id>/<thread>`, so that a sub-agent's turns do not displace the parent's chain.

Usage follows Anthropic's accounting: `input_tokens` are the prompt tokens not read from the cache,
`cache_read_input_tokens` those the engine had cached (the worker's `cached_tokens`).
"""

from __future__ import annotations

import hmac
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import xxhash
from aiohttp import web

from gateway.api_bridge import (
    Answer,
    Delta,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    chat_turn,
    compact_json,
    function_tool,
    relay,
    sse,
    tool_call,
)
from gateway.errors import ApiError
from gateway.session_id import MAX_LENGTH, explicit_session_id
from router.chat import TemplateError, encode_chat

if TYPE_CHECKING:
    from gateway.app import Gateway

BILLING_PREFIX = "x-anthropic-billing-header:"
CLAUDE_CODE_SESSION = "x-claude-code-session-id"
_CC_USER_SESSION = re.compile(r"_session_([0-9a-fA-F-]{36})$")
MAX_TOKENS_LIMIT = 1 << 20

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_IGNORED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_UNSUPPORTED_BLOCKS = frozenset({"image", "document", "search_result", "container_upload"})


def error_response(exc: ApiError) -> web.Response:
    """`{"type": "error", "error": {"type", "message"}}` with the gateway's status."""
    kind = _ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": exc.message}}
    return web.Response(
        status=exc.status,
        body=msgspec.json.encode(body),
        content_type="application/json",
        headers=exc.headers,
    )


# --- the request


def strip_billing_line(text: str) -> str:
    """`text` without Claude Code's per-request billing line at its head (if it has one)."""
    head = text.lstrip()
    if not head.startswith(BILLING_PREFIX):
        return text
    newline = head.find("\n")
    return "" if newline < 0 else head[newline + 1 :]


def _text_of(value: Any, where: str) -> str:
    """A string, or a list of text blocks (other fields such as `cache_control` ignored)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a string or a list of text blocks", param=where)
    parts = []
    for i, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _UNSUPPORTED_BLOCKS:
            raise ApiError(400, f"{where}[{i}]: {kind} blocks are not supported (text only)", param=where)
        if kind != "text" or not isinstance(block.get("text"), str):
            raise ApiError(400, f"{where}[{i}] must be a text block with a string 'text'", param=where)
        parts.append(block["text"])
    return "".join(parts)


def system_text(system: Any, strip_billing: bool) -> str:
    if system is None:
        return ""
    if isinstance(system, list):
        blocks = [b for b in system if isinstance(b, dict)]
        if strip_billing and blocks and isinstance(blocks[0].get("text"), str):
            first = strip_billing_line(blocks[0]["text"])
            blocks = ([{**blocks[0], "text": first}] if first else []) + blocks[1:]
            system = blocks
    text = _text_of(system, "system")
    return strip_billing_line(text) if strip_billing else text


def chat_messages(body: dict[str, Any], strip_billing: bool) -> list[dict[str, Any]]:
    """The Anthropic conversation as chat-completions messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    system = system_text(body.get("system"), strip_billing)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}: role must be 'user' or 'assistant'", param=where)
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        elif isinstance(content, list):
            out.extend(_blocks(message["role"], content, where))
        else:
            raise ApiError(400, f"{where}.content must be a string or a list of blocks", param=where)
    return out


def _blocks(role: str, blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """One Anthropic message's blocks as chat messages: tool results first (each its own `tool`
    message, as chat-completions clients send them), then the text, with the tool calls."""
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise ApiError(400, f"{at}: tool_use needs a string 'id' and 'name'", param=at)
            calls.append(tool_call(call_id, name, compact_json(block.get("input", {}))))
        elif kind == "tool_result" and role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise ApiError(400, f"{at}: tool_result needs a string 'tool_use_id'", param=at)
            text = _text_of(block.get("content", ""), f"{at}.content")
            if block.get("is_error") is True:
                text = "[error] " + text
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in _IGNORED_BLOCKS:
            continue
        elif kind in _UNSUPPORTED_BLOCKS:
            raise ApiError(400, f"{at}: {kind} blocks are not supported (text only)", param=at)
        else:
            raise ApiError(400, f"{at}: unsupported content block {kind!r} in a {role} message", param=at)
    out = results
    if texts or calls or not results:
        message: dict[str, Any] = {"role": role, "content": "".join(texts)}
        if calls:
            message["tool_calls"] = calls
        out = [*results, message]
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Custom tools as function tools; server tools (a `type` such as `web_search_20250305`) are
    ignored: no engine behind the gateway runs them."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "tools: must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ApiError(400, f"tools.{i}: must be an object", param=f"tools.{i}")
        if tool.get("type", "custom") != "custom":
            continue
        out.append(
            function_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"), f"tools.{i}")
        )
    return out or None


def _tool_choice(choice: Any) -> Any:
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(
        400, "tool_choice: type must be auto, any, tool (with a name) or none", param="tool_choice"
    )


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ApiError(400, f"{name}: must be a number between {low} and {high}", param=name)
        out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ApiError(400, "top_k: must be a positive integer", param="top_k")
        out["top_k"] = top_k
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop_sequences: must be a list of non-empty strings", param="stop_sequences")
        if stop:
            out["stop"] = stop
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None:
        out["tool_choice"] = choice
        if isinstance(body["tool_choice"], dict) and body["tool_choice"].get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: a non-empty string is required", param="model")
    return body


def claude_code_session(headers: Any, body: dict[str, Any]) -> str | None:
    """Claude Code's session id: its header, else the `_session_<uuid>` its `metadata.user_id` ends with
    (`user_<hash>_account_<uuid>_session_<uuid>`, what versions before the header sent)."""
    header = headers.get(CLAUDE_CODE_SESSION, "").strip()
    if header:
        return header
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    found = _CC_USER_SESSION.search(user_id) if isinstance(user_id, str) else None
    return found.group(1) if found else None


def session_of(headers: Any, body: dict[str, Any], messages: list[dict[str, Any]]) -> str | None:
    """The session id the client sent; each conversation of a Claude Code session its own child."""
    parent = None if headers.get("x-session-id", "").strip() else claude_code_session(headers, body)
    if parent:
        first = next((m for m in messages if m["role"] == "user"), messages[0])
        thread = xxhash.xxh3_64_hexdigest(compact_json(first).encode("utf-8", "surrogatepass"))[:12]
        return f"{parent[: MAX_LENGTH - 13]}/{thread}"
    return explicit_session_id(headers, body)


# --- the answer


def stop_reason(answer: Answer) -> str:
    if answer.tool_calls:
        return "tool_use"
    if answer.stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(answer.finish_reason or "stop", "end_turn")


def usage(answer: Answer) -> dict[str, int]:
    cached = min(answer.cached_tokens, answer.prompt_tokens)
    return {
        "input_tokens": answer.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": answer.completion_tokens,
    }


def _input_of(arguments: str) -> Any:
    try:
        value = msgspec.json.decode(arguments) if arguments else {}
    except msgspec.DecodeError:
        return {"arguments": arguments}  # the model wrote broken JSON: keep it, visibly
    return value if isinstance(value, dict) else {"value": value}


class MessagesTranslation:
    """One answer as an Anthropic message, or as its event stream."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = "msg_" + uuid.uuid4().hex
        self._block = -1  # index of the latest content block, -1 before the first
        self._open_kind = ""
        self._tool_blocks: dict[int, int] = {}  # tool call index -> its content block index

    def _message(self, content: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_,
        }

    async def whole(self, answer: Answer) -> bytes:
        content: list[dict[str, Any]] = []
        if answer.text or not answer.tool_calls:
            content.append({"type": "text", "text": answer.text})
        for call in answer.tool_calls:
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": _input_of(call.arguments)}
            )
        message = self._message(content, usage(answer))
        message["stop_reason"] = stop_reason(answer)
        message["stop_sequence"] = answer.stop_sequence
        return msgspec.json.encode(message)

    def start(self, prompt_tokens: int, expected_cached: int) -> bytes:
        cached = min(expected_cached, prompt_tokens)  # an estimate; message_delta has the engine's figure
        start_usage = {
            "input_tokens": prompt_tokens - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": 1,
        }
        return sse(
            "message_start", {"type": "message_start", "message": self._message([], start_usage)}
        ) + sse("ping", {"type": "ping"})

    def deltas(self, deltas: list[Delta]) -> bytes:
        out: list[bytes] = []
        for delta in deltas:
            if isinstance(delta, TextDelta):
                if self._open_kind != "text":
                    out.append(self._open({"type": "text", "text": ""}, "text"))
                out.append(self._delta({"type": "text_delta", "text": delta.text}))
            elif isinstance(delta, ToolCallStart):
                block = {"type": "tool_use", "id": delta.call.id, "name": delta.call.name, "input": {}}
                out.append(self._open(block, "tool_use"))
                self._tool_blocks[delta.index] = self._block
            elif isinstance(delta, ToolArgumentsDelta) and self._tool_blocks.get(delta.index) == self._block:
                out.append(self._delta({"type": "input_json_delta", "partial_json": delta.delta}))
        return b"".join(out)

    def _open(self, block: dict[str, Any], kind: str) -> bytes:
        closing = self._close()
        self._block += 1
        self._open_kind = kind
        return closing + sse(
            "content_block_start",
            {"type": "content_block_start", "index": self._block, "content_block": block},
        )

    def _close(self) -> bytes:
        if not self._open_kind:
            return b""
        self._open_kind = ""
        return sse("content_block_stop", {"type": "content_block_stop", "index": self._block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse(
            "content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta}
        )

    async def end(self, answer: Answer) -> bytes:
        opening = b"" if self._block >= 0 else self._open({"type": "text", "text": ""}, "text")
        delta = {"stop_reason": stop_reason(answer), "stop_sequence": answer.stop_sequence}
        return (
            opening
            + self._close()
            + sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(answer)})
            + sse("message_stop", {"type": "message_stop"})
        )

    def stream_error(self, message: str) -> bytes:
        return sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})


# --- the endpoints


class AnthropicApi:
    """`/v1/messages` and `/v1/messages/count_tokens` over a `Gateway`."""

    def __init__(self, gateway: Gateway, *, strip_billing: bool = True) -> None:
        self.gateway = gateway
        self.strip_billing = strip_billing

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        try:
            self._authorize(request)
            body = _decode(await self.gateway.read_body(request))
            turn = self._turn(body)
            explicit = session_of(request.headers, body, turn.messages or [])
            translation = MessagesTranslation(turn.model)

            async def relay_messages(*args: Any, **kwargs: Any) -> Any:
                return await relay(*args, **kwargs, translation=translation)

            return await self.gateway.serve_turn(
                request,
                turn,
                "/v1/chat/completions",
                started=started,
                explicit_session=explicit,
                relay=relay_messages,
            )
        except ApiError as exc:
            self.gateway.metrics.count_request(request.path, exc.status)
            return error_response(exc)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """The prompt's tokens as the model's workers count them (exact, through the same template)."""
        try:
            self._authorize(request)
            body = _decode(await self.gateway.read_body(request))
            messages = chat_messages(body, self.strip_billing)
            tools = chat_tools(body.get("tools"))
            workers = self.gateway._workers_for(body["model"])
            spec = self.gateway.bus.workers[next(iter(workers))].registration.tokenizer
            try:
                tokens = encode_chat(messages, await self.gateway.tokenizer(spec), tools)
            except TemplateError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
            return web.json_response({"input_tokens": len(tokens)})
        except ApiError as exc:
            return error_response(exc)

    def _turn(self, body: dict[str, Any]) -> Any:
        max_tokens = body.get("max_tokens")
        if (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
        ):
            raise ApiError(400, "max_tokens: an integer of at least 1 is required", param="max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream: must be a boolean", param="stream")
        messages = chat_messages(body, self.strip_billing)
        return chat_turn(
            body["model"],
            messages,
            tools=chat_tools(body.get("tools")),
            stream=stream,
            max_tokens=max_tokens,
            sampling=_sampling(body),
        )

    def _authorize(self, request: web.Request) -> None:
        """Anthropic's clients send the key as `x-api-key`; `Authorization: Bearer` works too."""
        keys = self.gateway.config.api_keys
        if not keys:
            return
        given = request.headers.get("x-api-key", "")
        if not given:
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
            raise ApiError(401, "invalid or missing API key")
