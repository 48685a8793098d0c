"""Client-side helpers for agent frameworks: bind a session id to an `openai` client, mark tool calls.

Everything goes through two plain HTTP headers, so any framework that can set default headers can do
the same without this module:

- `x-session-id: <id>`: every turn of one agent run carries the same id, so the gateway keeps the run
  on the worker that holds its KV cache (and tokenizes and hashes only each turn's new part).
- `x-kvgate-tool-call: pending`: this turn is part of a tool loop (the agent will run a tool and call
  back with its result), so the gateway pins the session's blocks on its worker for the expected
  think time instead of letting them be evicted.

```python
from openai import OpenAI
from gateway.middleware import AgentSession

session = AgentSession(OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none"))
reply = session.client.chat.completions.create(model=..., messages=...)
with session.tool_call():            # the turns sent inside run in a tool loop
    reply = session.client.chat.completions.create(model=..., messages=...)
```

Works the same with `AsyncOpenAI` (the client is only copied with extra headers).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, Self, TypeVar

SESSION_HEADER = "x-session-id"
TOOL_CALL_HEADER = "x-kvgate-tool-call"
TOOL_CALL_PENDING = "pending"


class HeaderOptions(Protocol):
    """What `bind_session` needs of a client: `openai.OpenAI` and `openai.AsyncOpenAI` have it."""

    def with_options(self, *, default_headers: Mapping[str, str] | None = None) -> Self: ...


ClientT = TypeVar("ClientT", bound=HeaderOptions)


def session_headers(session_id: str, tool_call_pending: bool = False) -> dict[str, str]:
    """The headers for one turn; for frameworks that take a `default_headers`/`extra_headers` dict."""
    headers = {SESSION_HEADER: session_id}
    if tool_call_pending:
        headers[TOOL_CALL_HEADER] = TOOL_CALL_PENDING
    return headers


def bind_session(client: ClientT, session_id: str, tool_call_pending: bool = False) -> ClientT:
    """A copy of an `openai.OpenAI` or `openai.AsyncOpenAI` client that sends the session headers."""
    return client.with_options(default_headers=session_headers(session_id, tool_call_pending))


class AgentSession:
    """One agent run: a stable session id, and a client that marks whether a tool loop is under way."""

    def __init__(self, client: Any, session_id: str | None = None) -> None:
        self.session_id = session_id or f"s-{uuid.uuid4().hex}"
        self._plain = bind_session(client, self.session_id)
        self._tool = bind_session(client, self.session_id, tool_call_pending=True)
        self._tool_depth = 0

    @property
    def client(self) -> Any:
        """The bound client for the next turn (marked while inside `tool_call()`)."""
        return self._tool if self._tool_depth else self._plain

    @property
    def headers(self) -> dict[str, str]:
        return session_headers(self.session_id, self._tool_depth > 0)

    @contextlib.contextmanager
    def tool_call(self) -> Iterator[AgentSession]:
        """Turns sent inside carry `x-kvgate-tool-call: pending`."""
        self._tool_depth += 1
        try:
            yield self
        finally:
            self._tool_depth -= 1
