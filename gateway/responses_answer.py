"""A worker's chat answer in the Responses API's shape: a Response object, or the Responses event
stream; stored on the way out (gateway.response_store) for a later `previous_response_id`."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.api_bridge import (
    Answer,
    Delta,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    sse,
    tool_call,
)
from gateway.response_store import StoredConversation

if TYPE_CHECKING:
    from gateway.responses_api import ResponsesApi


def output_items(answer: Answer, message_id: str, call_ids: list[str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if answer.text or not answer.tool_calls:
        items.append(message_item(message_id, answer.text, "completed"))
    for item_id, call in zip(call_ids, answer.tool_calls, strict=True):
        items.append(function_item(item_id, call.id, call.name, call.arguments, "completed"))
    return items


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status else []
    return {
        "type": "message",
        "id": item_id,
        "status": status or "in_progress",
        "role": "assistant",
        "content": content,
    }


def function_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def answer_message(answer: Answer) -> dict[str, Any]:
    """The answer as the chat message a later turn replays."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.tool_calls:
        message["tool_calls"] = [tool_call(c.id, c.name, c.arguments) for c in answer.tool_calls]
    return message


class ResponsesTranslation:
    """One answer as a Response object, or as the Responses event stream; stored on the way out."""

    def __init__(self, api: ResponsesApi, body: dict[str, Any], context: ResponseContext) -> None:
        self.api = api
        self.body = body
        self.context = context
        self.id = "resp_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self.session_id = ""
        self._seq = 0
        self._message_id = "msg_" + uuid.uuid4().hex
        self._call_ids: list[str] = []  # item ids of the function calls
        self._output: list[dict[str, Any]] = []  # the items streamed so far (done ones)
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text = ""

    def routed(self, headers: dict[str, str]) -> None:
        self.session_id = headers.get("x-kvgate-session", "")

    def response(self, status: str, output: list[dict[str, Any]], answer: Answer | None) -> dict[str, Any]:
        body = self.body
        usage = None
        incomplete = None
        if answer is not None:
            usage = {
                "input_tokens": answer.prompt_tokens,
                "input_tokens_details": {"cached_tokens": answer.cached_tokens},
                "output_tokens": answer.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            }
            if answer.finish_reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": self.context.store,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    async def whole(self, answer: Answer) -> bytes:
        self._call_ids = ["fc_" + uuid.uuid4().hex for _ in answer.tool_calls]
        output = output_items(answer, self._message_id, self._call_ids)
        await self._store(answer)
        return msgspec.json.encode(self.response("completed", output, answer))

    # --- streaming

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse(kind, data)

    def start(self, prompt_tokens: int, expected_cached: int) -> bytes:
        del prompt_tokens, expected_cached  # the Response carries usage at its end only
        created = self.response("in_progress", [], None)
        return self._event("response.created", response=created) + self._event(
            "response.in_progress", response=created
        )

    def deltas(self, deltas: list[Delta]) -> bytes:
        out: list[bytes] = []
        for delta in deltas:
            if isinstance(delta, TextDelta):
                if self._open is None or self._open["type"] != "message":
                    out.append(self._close())
                    out.append(self._open_message())
                self._text += delta.text
                out.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self._message_id,
                        output_index=len(self._output),
                        content_index=0,
                        delta=delta.text,
                        logprobs=[],
                    )
                )
            elif isinstance(delta, ToolCallStart):
                out.append(self._close())
                item = function_item(
                    "fc_" + uuid.uuid4().hex, delta.call.id, delta.call.name, "", "in_progress"
                )
                self._call_ids.append(item["id"])
                self._open = item
                out.append(
                    self._event("response.output_item.added", output_index=len(self._output), item=item)
                )
            elif isinstance(delta, ToolArgumentsDelta) and self._open is not None:
                self._open["arguments"] += delta.delta
                out.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self._open["id"],
                        output_index=len(self._output),
                        delta=delta.delta,
                    )
                )
        return b"".join(out)

    def _open_message(self) -> bytes:
        item = message_item(self._message_id, "", "")
        self._open = item
        index = len(self._output)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return self._event("response.output_item.added", output_index=index, item=item) + self._event(
            "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
        )

    def _close(self) -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        index = len(self._output)
        if item["type"] == "message":
            done = message_item(item["id"], self._text, "completed")
            part = done["content"][0]
            out = self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=self._text,
                logprobs=[],
            ) + self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            )
        else:
            done = {**item, "status": "completed"}
            out = self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        self._output.append(done)
        return out + self._event("response.output_item.done", output_index=index, item=done)

    async def end(self, answer: Answer) -> bytes:
        out = b""
        if not self._output and self._open is None:
            out += self._open_message()  # an empty answer is still one (empty) message
        out += self._close()
        await self._store(answer)
        final = self.response("completed", self._output, answer)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return out + self._event(kind, response=final)

    def stream_error(self, message: str) -> bytes:
        return self._event("error", code="upstream_failed", message=message, param=None)

    async def _store(self, answer: Answer) -> None:
        if not self.context.store:
            return
        conversation = StoredConversation(
            self.session_id, [*self.context.replay, answer_message(answer)], self.api.store.new_expiry()
        )
        await self.api.store.put(self.context.tenant, self.id, conversation)


class ResponseContext(msgspec.Struct):
    """What a response needs from its request: its tenant, whether to store it, what it continues."""

    tenant: str
    store: bool
    replay: list[dict[str, Any]]  # the conversation this response continues, without instructions
