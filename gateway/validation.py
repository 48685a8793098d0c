"""Checks a client's OpenAI body before anything is routed: every refusal is a 400 naming the field.

The body is kept as the client sent it (the worker receives it unchanged plus the `kvgate`
extension); only what the gateway itself needs is read out into a `Turn`. Everything in it is
untrusted: nesting is bounded (deep JSON would exhaust the stack in the template or the encoder),
token ids must fit the uint32 the hashing packs them into, and the fields other parts of the system
read (`user`, `metadata`, `tools`, `tool_calls`) are checked for their shape and size.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.errors import ApiError

Kind = Literal["chat", "completion"]

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = (1 << 31) - 1  # beyond any context; a bigger number is a probe, not a request
MAX_TOKEN_ID = (1 << 32) - 1  # block hashing packs token ids as little-endian uint32
MAX_DEPTH = 32  # JSON nesting: OpenAI bodies need about 8 (tool parameter schemas nest further)
MAX_USER_CHARS = 256
MAX_METADATA_PAIRS = 16  # OpenAI's limits for `metadata`
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


class Turn(msgspec.Struct):
    kind: Kind
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage as the client sent it
    max_tokens: int
    messages: list[dict[str, Any]] | None = None
    requested_max_tokens: int | None = None  # as the client sent it (None: the default)
    tools: list[Any] | None = None
    prompt: str | list[int] | None = None
    cache_salt: str | None = None


def parse_turn(raw: bytes, kind: Kind) -> Turn:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, f"request body nests deeper than {MAX_DEPTH}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:  # fewer brackets cannot nest deeper: no walk
        check_depth(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    wants_usage = False
    if options is not None:
        wants_usage = _optional(options, "include_usage", bool, False, param="stream_options.include_usage")
    n = _optional(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if _optional(body, "best_of", int, 1) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    requested = _max_tokens(body)
    max_tokens = DEFAULT_MAX_TOKENS if requested is None else requested
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = _optional(body, name, (int, float), None)
        if value is not None and not low <= value <= high:
            raise ApiError(400, f"'{name}' must be between {low} and {high}", param=name)
    _optional(body, "seed", int, None)
    _check_stop(body.get("stop"))
    salt = _optional(body, "cache_salt", str, None)
    _check_user_and_metadata(body)
    turn = Turn(
        kind, body, model, stream, wants_usage, max_tokens, cache_salt=salt, requested_max_tokens=requested
    )
    if kind == "chat":
        turn.messages = _messages(body.get("messages"))
        turn.tools = _tools(body.get("tools"))
    else:
        turn.prompt = _prompt(body.get("prompt"))
    return turn


def _optional(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any, *, param: str | None = None
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is not a number here
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value = None
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ApiError(400, f"'{param or name}' must be of type {names}", param=param or name)
    return value


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _optional(body, name, int, None)
        if value is not None:
            if not 1 <= value <= MAX_TOKENS_LIMIT:
                raise ApiError(400, f"'{name}' must be between 1 and {MAX_TOKENS_LIMIT}", param=name)
            return value
    return None


def check_depth(body: Any, limit: int = MAX_DEPTH) -> None:
    """400 when containers nest deeper than `limit`; iterative, so no depth can overflow the stack.
    Lists of plain values (token ids) are skipped in one C-level pass."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise ApiError(400, f"request body nests deeper than {limit}", code="invalid_json")
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, list) and not any(map(_is_container, value)):
            continue
        stack.extend((child, depth + 1) for child in children if _is_container(child))


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list))


def _check_user_and_metadata(body: dict[str, Any]) -> None:
    user = _optional(body, "user", str, None)
    if user is not None and len(user) > MAX_USER_CHARS:
        raise ApiError(400, f"'user' must be at most {MAX_USER_CHARS} characters", param="user")
    metadata = _optional(body, "metadata", dict, None)
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(400, f"'metadata' holds at most {MAX_METADATA_PAIRS} pairs", param="metadata")
    for key, value in metadata.items():
        long_key = len(key) > MAX_METADATA_KEY_CHARS
        if long_key or not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_CHARS:
            raise ApiError(
                400,
                f"'metadata' maps keys of up to {MAX_METADATA_KEY_CHARS} characters to strings of up to "
                f"{MAX_METADATA_VALUE_CHARS}",
                param=f"metadata.{key[:MAX_METADATA_KEY_CHARS]}",
            )


def _tools(tools: Any) -> list[Any] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ApiError(400, f"tools[{i}] must be an object", param=f"tools[{i}]")
        function = tool.get("function")
        if function is None:
            continue
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"tools[{i}].function must be an object with a name", param=f"tools[{i}]")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be an object", param=f"tools[{i}]")
    return tools


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        calls = message.get("tool_calls")
        if calls is not None and not (
            isinstance(calls, list)
            and all(isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls)
        ):
            raise ApiError(
                400, f"messages[{i}].tool_calls must be a list of objects", param=f"messages[{i}].tool_calls"
            )
    return messages


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in prompt)
    ):
        return prompt
    raise ApiError(
        400,
        f"'prompt' must be a string or a list of token ids from 0 to {MAX_TOKEN_ID} (one prompt per request)",
        param="prompt",
    )
