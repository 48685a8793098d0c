"""A worker's chat answer in Anthropic's Messages shape: a whole message, or its event stream.

Usage follows Anthropic's accounting: `input_tokens` are the prompt tokens not read from the cache,
`cache_read_input_tokens` those the engine had cached (the worker's `cached_tokens`).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from gateway.api_bridge import (
    Answer,
    Delta,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    sse,
)

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(answer: Answer) -> str:
    if answer.tool_calls:
        return "tool_use"
    if answer.stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(answer.finish_reason or "stop", "end_turn")


def usage(answer: Answer) -> dict[str, int]:
    cached = min(answer.cached_tokens, answer.prompt_tokens)
    return {
        "input_tokens": answer.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": answer.completion_tokens,
    }


def _input_of(arguments: str) -> Any:
    try:
        value = msgspec.json.decode(arguments) if arguments else {}
    except msgspec.DecodeError:
        return {"arguments": arguments}  # the model wrote broken JSON: keep it, visibly
    return value if isinstance(value, dict) else {"value": value}


class MessagesTranslation:
    """One answer as an Anthropic message, or as its event stream."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = "msg_" + uuid.uuid4().hex
        self._block = -1  # index of the latest content block, -1 before the first
        self._open_kind = ""
        self._tool_blocks: dict[int, int] = {}  # tool call index -> its content block index

    def _message(self, content: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_,
        }

    async def whole(self, answer: Answer) -> bytes:
        content: list[dict[str, Any]] = []
        if answer.text or not answer.tool_calls:
            content.append({"type": "text", "text": answer.text})
        for call in answer.tool_calls:
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": _input_of(call.arguments)}
            )
        message = self._message(content, usage(answer))
        message["stop_reason"] = stop_reason(answer)
        message["stop_sequence"] = answer.stop_sequence
        return msgspec.json.encode(message)

    def start(self, prompt_tokens: int, expected_cached: int) -> bytes:
        cached = min(expected_cached, prompt_tokens)  # an estimate; message_delta has the engine's figure
        start_usage = {
            "input_tokens": prompt_tokens - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": 1,
        }
        return sse(
            "message_start", {"type": "message_start", "message": self._message([], start_usage)}
        ) + sse("ping", {"type": "ping"})

    def deltas(self, deltas: list[Delta]) -> bytes:
        out: list[bytes] = []
        for delta in deltas:
            if isinstance(delta, TextDelta):
                if self._open_kind != "text":
                    out.append(self._open({"type": "text", "text": ""}, "text"))
                out.append(self._delta({"type": "text_delta", "text": delta.text}))
            elif isinstance(delta, ToolCallStart):
                block = {"type": "tool_use", "id": delta.call.id, "name": delta.call.name, "input": {}}
                out.append(self._open(block, "tool_use"))
                self._tool_blocks[delta.index] = self._block
            elif isinstance(delta, ToolArgumentsDelta) and self._tool_blocks.get(delta.index) == self._block:
                out.append(self._delta({"type": "input_json_delta", "partial_json": delta.delta}))
        return b"".join(out)

    def _open(self, block: dict[str, Any], kind: str) -> bytes:
        closing = self._close()
        self._block += 1
        self._open_kind = kind
        return closing + sse(
            "content_block_start",
            {"type": "content_block_start", "index": self._block, "content_block": block},
        )

    def _close(self) -> bytes:
        if not self._open_kind:
            return b""
        self._open_kind = ""
        return sse("content_block_stop", {"type": "content_block_stop", "index": self._block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse(
            "content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta}
        )

    async def end(self, answer: Answer) -> bytes:
        opening = b"" if self._block >= 0 else self._open({"type": "text", "text": ""}, "text")
        delta = {"stop_reason": stop_reason(answer), "stop_sequence": answer.stop_sequence}
        return (
            opening
            + self._close()
            + sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(answer)})
            + sse("message_stop", {"type": "message_stop"})
        )

    def stream_error(self, message: str) -> bytes:
        return sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})
