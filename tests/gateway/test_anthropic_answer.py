"""A worker's chat answer as Anthropic Messages, without processes: an answer with tool calls (our
engines emit none, vLLM's tool parsers do), whole and streamed. The request side:
test_anthropic_request.py."""

from __future__ import annotations

import asyncio

import msgspec

from gateway.anthropic_answer import MessagesTranslation
from gateway.api_bridge import ChatReader
from tests.gateway.tool_call_chunks import CHUNKS


def _events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for event in raw.decode().split("\n\n"):
        if event:
            name, data = event.split("\n")
            out.append((name.removeprefix("event: "), msgspec.json.decode(data.removeprefix("data: "))))
    return out


def test_a_streamed_tool_call_gives_anthropic_events() -> None:
    reader, translation = ChatReader(), MessagesTranslation("m")
    raw = translation.start(100, 48)
    for chunk in CHUNKS:
        raw += translation.deltas(reader.chunk(chunk))
    raw += asyncio.run(translation.end(reader.result()))
    events = _events(raw)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["cache_read_input_tokens"] == 48  # the estimate
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_9", "name": "ls", "input": {}}
    assert "".join(d["delta"]["partial_json"] for _, d in events[6:8]) == '{"path":"/"}'
    assert events[9][1]["delta"]["stop_reason"] == "tool_use"
    assert events[9][1]["usage"] == {
        "input_tokens": 36,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 64,
        "output_tokens": 7,
    }


def test_a_whole_answer_with_a_tool_call() -> None:
    answer = ChatReader().whole(
        {
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "ls", "arguments": '{"a":1}'},
                            }
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        }
    )
    message = msgspec.json.decode(asyncio.run(MessagesTranslation("m").whole(answer)))
    assert message["content"] == [{"type": "tool_use", "id": "call_1", "name": "ls", "input": {"a": 1}}]
    assert message["stop_reason"] == "tool_use" and message["usage"]["input_tokens"] == 10
