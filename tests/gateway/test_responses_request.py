"""Responses API requests as chat conversations, without processes."""

from __future__ import annotations

import pytest

from gateway.errors import ApiError
from gateway.responses_request import input_messages


def test_items_become_chat_messages_with_calls_joining_their_assistant_message() -> None:
    items = [
        {"role": "user", "content": "go"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "cat", "arguments": '{"f":"a"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "a b"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "x"}]},
    ]
    assert input_messages(items) == [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "cat", "arguments": '{"f":"a"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a b"},
        {"role": "tool", "tool_call_id": "c2", "content": "x"},
    ]
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    for bad in (
        [],
        [{"type": "item_reference", "id": "x"}],
        [{"role": "user", "content": [{"type": "input_image"}]}],
    ):
        with pytest.raises(ApiError):
            input_messages(bad)
