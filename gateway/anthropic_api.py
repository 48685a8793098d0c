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

The request's translation is `gateway.anthropic_request`, the answer's `gateway.anthropic_answer`; this
module serves the endpoints.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from gateway.anthropic_answer import MessagesTranslation
from gateway.anthropic_request import chat_messages, chat_tools, decode_body, sampling_fields, session_of
from gateway.api_bridge import (
    chat_turn,
    relay,
)
from gateway.errors import ApiError
from router.chat import TemplateError, encode_chat

if TYPE_CHECKING:
    from gateway.app import Gateway

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
            body = decode_body(await self.gateway.turns.read_body(request))
            turn = self._turn(body)
            explicit = session_of(request.headers, body, turn.messages or [])
            translation = MessagesTranslation(turn.model)

            async def relay_messages(*args: Any, **kwargs: Any) -> Any:
                return await relay(*args, **kwargs, translation=translation)

            return await self.gateway.turns.serve_turn(
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
            body = decode_body(await self.gateway.turns.read_body(request))
            messages = chat_messages(body, self.strip_billing)
            tools = chat_tools(body.get("tools"))
            workers = self.gateway.turns.workers_for(body["model"])
            spec = self.gateway.bus.workers[next(iter(workers))].registration.tokenizer
            try:
                tokens = encode_chat(messages, await self.gateway.turns.tokenizer(spec), tools)
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
            sampling=sampling_fields(body),
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
