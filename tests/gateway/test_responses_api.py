"""A worker's chat answer as a Responses API response, and the response store, without processes. The
request side: test_responses_request.py."""

from __future__ import annotations

import asyncio
import time

import msgspec

from gateway.api_bridge import ChatReader
from gateway.response_store import ResponseStore, StoredConversation, tenant_of
from gateway.responses_answer import ResponseContext, ResponsesTranslation
from tests.gateway.test_anthropic_api import CHUNKS


class _Store:
    def __init__(self) -> None:
        self.kept: dict[str, StoredConversation] = {}

    def new_expiry(self) -> float:
        return time.time() + 60

    async def put(self, tenant: str, response_id: str, conversation: StoredConversation) -> bool:
        self.kept[f"{tenant}.{response_id}"] = conversation
        return True


class _Api:
    store = _Store()


def test_a_streamed_tool_call_gives_responses_events_and_is_stored() -> None:
    api = _Api()
    body = {"model": "m", "input": "go"}
    context = ResponseContext("anon", True, [{"role": "user", "content": "go"}])
    translation = ResponsesTranslation(api, body, context)
    translation.routed({"x-kvgate-session": "s1"})
    reader = ChatReader()
    raw = translation.start(100, 0)
    for chunk in CHUNKS:
        raw += translation.deltas(reader.chunk(chunk))
    raw += asyncio.run(translation.end(reader.result()))
    events = [msgspec.json.decode(e.split(b"\ndata: ", 1)[1]) for e in raw.split(b"\n\n") if e]
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["call_id"] == "call_9" and final["output"][1]["arguments"] == '{"path":"/"}'
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 64
    stored = api.store.kept[f"anon.{translation.id}"]
    assert stored.session_id == "s1"
    assert stored.messages[-1]["tool_calls"][0]["function"] == {"name": "ls", "arguments": '{"path":"/"}'}


async def test_store_is_per_tenant_expires_and_is_bounded_in_bytes() -> None:
    store = ResponseStore(
        "unused", ttl_s=60, max_bytes=4096, max_entry_bytes=2048
    )  # no bus: this process only
    conversation = StoredConversation("s", [{"role": "user", "content": "x" * 100}], store.new_expiry())
    assert await store.put(tenant_of("key-a"), "resp_1", conversation)
    assert (await store.get(tenant_of("key-a"), "resp_1")) == conversation
    assert await store.get(tenant_of("key-b"), "resp_1") is None
    assert tenant_of("key-a") != tenant_of("key-b") and "key-a" not in tenant_of("key-a")
    expired = StoredConversation("s", [], time.time() - 1)
    await store.put("anon", "resp_old", expired)
    assert await store.get("anon", "resp_old") is None
    too_big = StoredConversation("s", [{"role": "user", "content": "x" * 4000}], store.new_expiry())
    assert not await store.put("anon", "resp_big", too_big)
    for i in range(100):  # far over 4 KiB in all: the oldest go first
        await store.put("anon", f"resp_{i}", conversation)
    assert store._bytes <= 4096
    assert await store.get("anon", "resp_99") is not None and await store.get("anon", "resp_0") is None
