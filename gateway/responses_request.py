"""A Responses API request as the chat conversation it stands for: `input` items (messages,
`function_call`, `function_call_output`) as chat messages, function tools as chat tools, and the
sampling fields the engines honour. Images and files are refused (400)."""

from __future__ import annotations

from typing import Any

from gateway.api_bridge import function_tool, tool_call
from gateway.errors import ApiError

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
_UNSUPPORTED_PARTS = frozenset({"input_image", "input_file", "input_audio"})
_IGNORED_ITEMS = frozenset({"reasoning"})


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"'{where}' must be a string or a list of content parts", param=where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _UNSUPPORTED_PARTS:
            raise ApiError(400, f"'{where}[{i}]': {kind} is not supported (text only)", param=where)
        text = part.get("text", part.get("refusal")) if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(text, str):
            raise ApiError(400, f"'{where}[{i}]' must be a text content part", param=where)
        parts.append(text)
    return "".join(parts)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages; function calls join the assistant message they follow."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise ApiError(400, f"'{where}.role' must be one of {sorted(_ROLES)}", param=where)
            out.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
                raise ApiError(400, f"'{where}' needs string call_id, name and arguments", param=where)
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                out.append(last)
            last.setdefault("tool_calls", []).append(tool_call(call_id, name, arguments))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise ApiError(400, f"'{where}.call_id' must be a string", param=where)
            output = _text(item.get("output", ""), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind in _IGNORED_ITEMS:
            continue
        else:
            raise ApiError(400, f"'{where}': items of type {kind!r} are not supported", param=where)
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Function tools as chat tools; built-in tools (web search, ...) are ignored: no engine runs them."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ApiError(400, f"'tools[{i}]' must be an object", param=f"tools[{i}]")
        if tool.get("type") == "function":
            out.append(
                function_tool(
                    tool.get("name"), tool.get("description"), tool.get("parameters"), f"tools[{i}]"
                )
            )
    return out or None


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ApiError(400, f"'{name}' must be a number between {low} and {high}", param=name)
        out[name] = value
    choice = body.get("tool_choice")
    if choice in ("auto", "none", "required"):
        out["tool_choice"] = choice
    elif (
        isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str)
    ):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        raise ApiError(400, "'tool_choice' must be auto, none, required or a function", param="tool_choice")
    if isinstance(body.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    return out


def max_output_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_output_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "'max_output_tokens' must be an integer of at least 1", param="max_output_tokens")
    return value
