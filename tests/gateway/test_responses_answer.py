"""A worker's chat answer as a Responses API response, stored on the way out, without processes. The
request side: test_responses_request.py; the store: test_response_store.py."""

from __future__ import annotations

import asyncio

import msgspec

from gateway.api_bridge import ChatReader
from gateway.response_store import ResponseStore
from gateway.responses_answer import ResponseContext, ResponsesTranslation
from tests.gateway.tool_call_chunks import CHUNKS


class _Api:
    """What a translation reads of its `ResponsesApi`: the store (a real one, in this process only)."""

    store = ResponseStore("unused", ttl_s=60)


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
    stored = asyncio.run(api.store.get("anon", translation.id))
    assert stored is not None
    assert stored.session_id == "s1"
    assert stored.messages[-1]["tool_calls"][0]["function"] == {"name": "ls", "arguments": '{"path":"/"}'}
