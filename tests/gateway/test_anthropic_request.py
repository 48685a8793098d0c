"""Anthropic Messages requests as chat conversations, without processes: blocks, tools, the billing
line, Claude Code's sessions."""

from __future__ import annotations

import pytest

from gateway.anthropic_request import chat_messages, chat_tools, session_of, strip_billing_line
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
