"""An Anthropic Messages request as the chat conversation it stands for: `system` first, `tool_use`
blocks as the assistant's tool calls, `tool_result` blocks as `tool` messages, custom tools as function
tools; Claude Code's per-request billing line cut from the system prompt; its session and each of its
conversations (`<id>/<thread>`) named. Images and documents are refused (400); what the engines cannot
honour (thinking blocks, server tools) is ignored."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import xxhash

from gateway.api_bridge import compact_json, function_tool, tool_call
from gateway.errors import ApiError
from gateway.session_id import MAX_LENGTH, explicit_session_id

BILLING_PREFIX = "x-anthropic-billing-header:"
CLAUDE_CODE_SESSION = "x-claude-code-session-id"
_CC_USER_SESSION = re.compile(r"_session_([0-9a-fA-F-]{36})$")
_IGNORED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_UNSUPPORTED_BLOCKS = frozenset({"image", "document", "search_result", "container_upload"})


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


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
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


def decode_body(raw: bytes) -> dict[str, Any]:
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
