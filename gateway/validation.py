"""Checks a client's OpenAI body before anything is routed: every refusal is a 400 naming the field.

The body is kept as the client sent it (the worker receives it unchanged plus the `kvgate`
extension); only what the gateway itself needs is read out into a `Turn`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.errors import ApiError

Kind = Literal["chat", "completion"]

DEFAULT_MAX_TOKENS = 16


class Turn(msgspec.Struct):
    kind: Kind
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage as the client sent it
    max_tokens: int
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    prompt: str | list[int] | None = None
    cache_salt: str | None = None


def parse_turn(raw: bytes, kind: Kind) -> Turn:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
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
    max_tokens = _max_tokens(body)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = _optional(body, name, (int, float), None)
        if value is not None and not low <= value <= high:
            raise ApiError(400, f"'{name}' must be between {low} and {high}", param=name)
    _optional(body, "seed", int, None)
    _check_stop(body.get("stop"))
    salt = _optional(body, "cache_salt", str, None)
    turn = Turn(kind, body, model, stream, wants_usage, max_tokens, cache_salt=salt)
    if kind == "chat":
        turn.messages = _messages(body.get("messages"))
        turn.tools = _optional(body, "tools", list, None)
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


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _optional(body, name, int, None)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"'{name}' must be at least 1", param=name)
            return value
    return DEFAULT_MAX_TOKENS


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
    return messages


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return prompt
    raise ApiError(
        400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt"
    )
