"""The session id a client sent, looked up in the order REFERENCE.md lists (headers, then body fields)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADERS: tuple[str, ...] = (
    "x-session-id",
    "x-claude-code-session-id",
    "session_id",
    "session-id",
    "x-session-affinity",
    "x-opencode-session",
    "helicone-session-id",
    "x-dynamo-session-id",
)

MAX_LENGTH = 256  # an id is a key in bounded tables; a longer one is cut, not refused


def explicit_session_id(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    for name in HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()[:MAX_LENGTH]
    metadata = body.get("metadata")
    candidates = [body.get("prompt_cache_key")]
    if isinstance(metadata, dict):
        candidates += [metadata.get("session_id"), metadata.get("user_id")]
    candidates.append(body.get("user"))
    for value in candidates:
        if isinstance(value, str) and value.strip():
            return value.strip()[:MAX_LENGTH]
    return None
