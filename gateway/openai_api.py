"""The OpenAI API's endpoints: `/v1/chat/completions`, `/v1/completions` and `/v1/models`."""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.errors import ApiError
from gateway.validation import Kind, parse_turn

if TYPE_CHECKING:
    from gateway.app import Gateway


class OpenAiApi:
    """The OpenAI-compatible endpoints over a `Gateway`; turns go through its `Turns`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._turn(request, "chat", "/v1/chat/completions")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._turn(request, "completion", "/v1/completions")

    async def _turn(self, request: web.Request, kind: Kind, path: str) -> web.StreamResponse:
        started = time.monotonic()
        self._authorize(request)
        turn = parse_turn(await self.gateway.turns.read_body(request), kind)
        return await self.gateway.turns.serve_turn(request, turn, path, started=started)

    async def models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        lengths: dict[str, list[int]] = {}
        for state in self.gateway.bus.workers.values():
            lengths.setdefault(state.registration.model, []).append(state.registration.max_model_len)
        data = []
        for name in sorted(lengths):
            model: dict[str, object] = {"id": name, "object": "model", "created": 0, "owned_by": "kvgate"}
            if min(lengths[name]) > 0:  # what every worker of the model serves, when they all said
                model["max_model_len"] = min(lengths[name])
            data.append(model)
        return web.json_response({"object": "list", "data": data})

    def _authorize(self, request: web.Request) -> None:
        keys = self.gateway.config.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
