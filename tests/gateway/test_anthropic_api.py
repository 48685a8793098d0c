"""Anthropic Messages <-> chat completions translation, without processes: the request side, and a
worker answer with tool calls (our engines emit none, vLLM's tool parsers do) in both shapes."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gateway.anthropic_api import (
    MessagesTranslation,
    chat_messages,
    chat_tools,
    session_of,
    strip_billing_line,
)
from gateway.api_bridge import ChatReader
from gateway.errors import ApiError


def test_billing_line_is_stripped_only_at_the_head() -> None:
    line = "x-anthropic-billing-header: cc_version=2.0.1; cch=ab12;\nYou are Claude Code."
    assert strip_billing_line(line) == "You are Claude Code."
    assert strip_billing_line("You are Claude Code.\n" + line) == "You are Claude Code.\n" + line
    body = {
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cch=1;"},
            {"type": "text", "text": "S"},
        ],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert chat_messages(body, strip_billing=True)[0] == {"role": "system", "content": "S"}
    assert chat_messages(body, strip_billing=False)[0]["content"].startswith("x-anthropic-billing-header")


def test_tool_use_and_tool_result_become_chat_tool_calls() -> None:
    body = {
        "system": "sys",
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {"path": "/", "all": True}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "a b"}],
                    },
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
    }
    assert chat_messages(body, strip_billing=True) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "calling",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "ls", "arguments": '{"path":"/","all":true}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a b"},
        {"role": "user", "content": "and?"},
    ]
    tools = [
        {"name": "ls", "description": "list", "input_schema": {"type": "object"}},
        {"type": "bash_20250124", "name": "bash"},
    ]
    assert chat_tools(tools) == [
        {
            "type": "function",
            "function": {"name": "ls", "description": "list", "parameters": {"type": "object"}},
        }
    ]
    with pytest.raises(ApiError) as refused:
        chat_messages({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, True)
    assert refused.value.status == 400 and "image" in refused.value.message


CHUNKS = [
    {
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "Let me look."}, "finish_reason": None}
        ]
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "ls", "arguments": ""},
                        }
                    ]
                },
            }
        ]
    },
    {
        "choices": [
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"path":'}}]}}
        ]
    },
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"/"}'}}]}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {
        "choices": [],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 64},
        },
    },
]


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


def test_claude_code_sessions_and_their_conversations() -> None:
    main = [{"role": "user", "content": "fix the bug"}]
    task = [{"role": "user", "content": "search for parse()"}]
    header = {"x-claude-code-session-id": "abc"}
    a, b = session_of(header, {}, main), session_of(header, {}, task)
    assert a.startswith("abc/") and b.startswith("abc/") and a != b
    assert session_of(header, {}, [*main, {"role": "assistant", "content": "ok"}]) == a  # later turns
    uuid_ = "0b6a1c57-1f7e-4a0e-9d2b-1f9e3c2d4a5b"
    body = {"metadata": {"user_id": f"user_ab12_account_{uuid_}_session_{uuid_}"}}
    assert session_of({}, body, main).startswith(uuid_ + "/")  # the id older versions sent in metadata
    assert session_of({"x-session-id": "mine", **header}, body, main) == "mine"  # the generic header first
    assert session_of({}, {"metadata": {"user_id": "someone"}}, main) == "someone"
