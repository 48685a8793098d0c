"""A worker's streamed chat answer with a tool call, as vLLM's tool parsers stream one (our engines emit
none): some text, a call to `ls` whose arguments come in two pieces, the finish, and the usage chunk
(100 prompt tokens, 64 of them cached, 7 generated). The API translations' tests read it."""

from __future__ import annotations

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
