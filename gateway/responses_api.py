"""OpenAI's Responses API (`POST /v1/responses`), as Codex CLI and the OpenAI Agents SDK speak it, served
through the gateway's chat path.

`input` (a string, or items: messages, `function_call`, `function_call_output`) becomes chat messages,
`instructions` a system message first; function tools become chat tools. A `previous_response_id`
replays the stored conversation of that response (gateway.response_store: per tenant, TTL, bounded,
shared by replicas through the bus) as the head of the prompt, and its session: a chain is an explicit
session. `store: false` keeps the response out of the store. Built-in tools (web search, file search,
...) and fields no engine honours (`reasoning`, `include`, `truncation`, `text` formats other than
plain text aside) are accepted and ignored; images and files are refused (400). The request's
translation is `gateway.responses_request`, the answer's `gateway.responses_answer`; this module serves
the endpoint and keeps the chain.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from gateway.api_bridge import (
    chat_turn,
    relay,
)
from gateway.errors import ApiError
from gateway.response_store import ResponseStore, StoredConversation, tenant_of
from gateway.responses_answer import ResponseContext, ResponsesTranslation
from gateway.responses_request import chat_tools, input_messages, max_output_tokens, sampling_fields
from gateway.session_id import explicit_session_id
from gateway.validation import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    from gateway.app import Gateway

# --- the endpoint


class ResponsesApi:
    """`POST /v1/responses` over a `Gateway`."""

    def __init__(self, gateway: Gateway, store: ResponseStore) -> None:
        self.gateway = gateway
        self.store = store

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.create)

    async def create(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        tenant = tenant_of(self._authorize(request))
        body = self._decode(await self.gateway.turns.read_body(request))
        self.store.nc = self.gateway.replication.nc
        previous = await self._previous(tenant, body.get("previous_response_id"))
        new = input_messages(body.get("input"))
        replay = [*(previous.messages if previous else []), *new]
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ApiError(400, "'instructions' must be a string", param="instructions")
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + replay
        store = body.get("store", True)
        if not isinstance(store, bool):
            raise ApiError(400, "'store' must be a boolean", param="store")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        max_tokens = max_output_tokens(body)
        sampling = sampling_fields(body)
        turn = chat_turn(
            body["model"],
            messages,
            tools=chat_tools(body.get("tools")),
            stream=stream,
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            sampling=sampling,
        )
        if max_tokens is None:
            del turn.body["max_tokens"]  # the worker's own default, as for a chat request without one
        explicit = explicit_session_id(request.headers, {}) or (previous.session_id if previous else None)
        explicit = explicit or explicit_session_id({}, body)
        translation = ResponsesTranslation(self, body, ResponseContext(tenant, store, replay))

        async def relay_responses(*args: Any, **kwargs: Any) -> Any:
            translation.routed(kwargs["headers"])
            return await relay(*args, **kwargs, translation=translation)

        return await self.gateway.turns.serve_turn(
            request,
            turn,
            "/v1/chat/completions",
            started=started,
            explicit_session=explicit,
            relay=relay_responses,
        )

    async def _previous(self, tenant: str, response_id: Any) -> StoredConversation | None:
        if response_id is None:
            return None
        if not isinstance(response_id, str) or not response_id:
            raise ApiError(400, "'previous_response_id' must be a string", param="previous_response_id")
        found = await self.store.get(tenant, response_id)
        if found is None:
            raise ApiError(
                404,
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return found

    @staticmethod
    def _decode(raw: bytes) -> dict[str, Any]:
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
        if body.get("conversation") is not None:
            raise ApiError(
                400, "'conversation' is not supported; chain with previous_response_id", param="conversation"
            )
        return body

    def _authorize(self, request: web.Request) -> str | None:
        """The API key (the tenant); 401 when keys are configured and this is none of them."""
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        keys = self.gateway.config.api_keys
        if keys and not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
        return given or None
