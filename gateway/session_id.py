"""The session id a client sent: the first of `HEADERS` present (kvgate's own, then those agent
frameworks and peer routers send), else the first of the body's `prompt_cache_key`,
`metadata.session_id`, `metadata.user_id` and `user`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from gateway.errors import ApiError

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

# the session that forked this one (a sub-agent's parent): the router keeps them together when they share
# a prefix (Dynamo's header, and a plain one)
PARENT_HEADERS: tuple[str, ...] = ("x-dynamo-parent-session-id", "x-parent-session-id")

MAX_LENGTH = 256  # an id is a key in bounded tables; a longer one is cut, not refused
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def explicit_session_id(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The first id present, stripped and cut to MAX_LENGTH; 400 for one holding a control character
    (never part of an id, and it cannot be echoed in a response header)."""
    for name in HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return _checked(value, name)
    metadata = body.get("metadata")
    candidates = [("prompt_cache_key", body.get("prompt_cache_key"))]
    if isinstance(metadata, dict):
        candidates += [("metadata.session_id", metadata.get("session_id"))]
        candidates += [("metadata.user_id", metadata.get("user_id"))]
    candidates.append(("user", body.get("user")))
    for name, value in candidates:
        if isinstance(value, str) and value.strip():
            return _checked(value, name)
    return None


def parent_session_id(headers: Mapping[str, str]) -> str | None:
    """The parent session a sub-agent's request names, if any (same checks as a session id)."""
    for name in PARENT_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return _checked(value, name)
    return None


def _checked(value: str, name: str) -> str:
    if _CONTROL.search(value):
        raise ApiError(400, f"the session id in '{name}' holds a control character", param=name)
    return value.strip()[:MAX_LENGTH]


def header_value(session_id: str) -> str:
    """A session id as a response header can carry it: printable ASCII, the rest percent-encoded."""
    if session_id.isascii() and session_id.isprintable() and " " not in session_id and "%" not in session_id:
        return session_id  # nothing to encode (`_HEADER_SAFE` only): what `quote` returns, ~10x faster
    return quote(session_id, safe=_HEADER_SAFE)
