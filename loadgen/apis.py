"""The same turns through Anthropic's Messages API or OpenAI's Responses API (`kvgate loadgen --api`).

Workloads speak chat completions (system, user, assistant with `tool_calls`, `tool` results); each
format here renders a turn in its API (the gateway translates it back, so the worker sees the same
prompt) and reads that API's stream into the same `Outcome`: a text or tool-argument delta is a token
event, usage comes from the final event (`message_delta`, `response.completed`).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from loadgen.client import ChatStream, StreamError, event_data
from loadgen.workloads import Turn

API_NAMES = ("chat", "messages", "responses")


class _EventStream(ChatStream):
    """An API whose events are JSON objects with a `type`; subclasses read them."""

    def _event(self, event: bytes, now: float) -> None:
        raw = event_data(event)
        if raw is None:
            return
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise StreamError(f"bad SSE data: {exc}") from exc
        if isinstance(data, dict):
            self._read(data, now)

    def _read(self, data: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def _token(self, piece: str, now: float, text: bool) -> None:
        if text:
            self._pieces.append(piece)
        self._token_event(now)


def _error(data: dict[str, Any]) -> StreamError:
    error = data.get("error", data)
    message = error.get("message") if isinstance(error, dict) else error
    return StreamError(f"error event: {message}")


class MessagesStream(_EventStream):
    def _read(self, data: dict[str, Any], now: float) -> None:
        kind = data.get("type")
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                self._token(delta["text"], now, text=True)
            elif delta.get("partial_json"):
                self._token(delta["partial_json"], now, text=False)
        elif kind == "message_delta":
            self.outcome.finish_reason = (data.get("delta") or {}).get("stop_reason")
            usage = data.get("usage") or {}
            cached = usage.get("cache_read_input_tokens") or 0
            if usage.get("input_tokens") is not None:
                self.outcome.prompt_tokens = usage["input_tokens"] + cached
                self.outcome.cached_tokens = cached
            self.outcome.output_tokens = usage.get("output_tokens") or 0
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            raise _error(data)


class ResponsesStream(_EventStream):
    def _read(self, data: dict[str, Any], now: float) -> None:
        kind = data.get("type")
        if kind == "response.output_text.delta" and data.get("delta"):
            self._token(data["delta"], now, text=True)
        elif kind == "response.function_call_arguments.delta" and data.get("delta"):
            self._token(data["delta"], now, text=False)
        elif kind in ("response.completed", "response.incomplete"):
            response = data.get("response") or {}
            usage = response.get("usage") or {}
            self.outcome.prompt_tokens = usage.get("input_tokens")
            self.outcome.cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens")
            self.outcome.output_tokens = usage.get("output_tokens") or 0
            incomplete = response.get("incomplete_details") or {}
            self.outcome.finish_reason = "length" if incomplete.get("reason") else "stop"
            self.done = True
        elif kind in ("error", "response.failed"):
            raise _error(data.get("response", data) if kind == "response.failed" else data)


# --- request bodies


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"arguments": text}


def messages_body(model: str, turn: Turn) -> dict[str, Any]:
    """A chat turn as an Anthropic Messages request."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in turn.messages:
        role, content = message["role"], message.get("content") or ""
        if role in ("system", "developer"):
            system.append(content)
        elif role == "tool":
            block = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": content}
            if messages and messages[-1]["role"] == "user" and isinstance(messages[-1]["content"], list):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
        elif role == "assistant" and message.get("tool_calls"):
            blocks: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            for call in message["tool_calls"]:
                function = call["function"]
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call["id"],
                        "name": function["name"],
                        "input": _arguments(function["arguments"]),
                    }
                )
            messages.append({"role": "assistant", "content": blocks})
        else:
            messages.append({"role": role, "content": content})
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": turn.max_tokens,
        "messages": messages,
        "stream": True,
    }
    if system:
        body["system"] = "".join(system)
    if turn.tools:
        body["tools"] = [
            {
                "name": f["name"],
                "description": f.get("description", ""),
                "input_schema": f.get("parameters", {}),
            }
            for f in (t["function"] for t in turn.tools)
        ]
    return body


def responses_body(model: str, turn: Turn) -> dict[str, Any]:
    """A chat turn as a Responses request: the whole conversation as input items (`store` false:
    nothing is kept for a chain nobody continues)."""
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for message in turn.messages:
        role, content = message["role"], message.get("content") or ""
        if role in ("system", "developer") and not items:
            instructions.append(content)
        elif role == "tool":
            items.append(
                {"type": "function_call_output", "call_id": message["tool_call_id"], "output": content}
            )
        else:
            if content or not message.get("tool_calls"):
                items.append({"type": "message", "role": role, "content": content})
            for call in message.get("tool_calls") or []:
                function = call["function"]
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call["id"],
                        "name": function["name"],
                        "arguments": function["arguments"],
                    }
                )
    body: dict[str, Any] = {
        "model": model,
        "input": items,
        "max_output_tokens": turn.max_tokens,
        "stream": True,
        "store": False,
    }
    if instructions:
        body["instructions"] = "".join(instructions)
    if turn.tools:
        body["tools"] = [{"type": "function", **t["function"]} for t in turn.tools]
    return body


class ApiFormat(msgspec.Struct, frozen=True):
    path: str
    body: Any  # (model, turn) -> dict
    stream: Any  # Outcome -> ChatStream


FORMATS: dict[str, ApiFormat] = {
    "messages": ApiFormat("/messages", messages_body, MessagesStream),
    "responses": ApiFormat("/responses", responses_body, ResponsesStream),
}
