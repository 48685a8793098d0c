"""`kvgate loadgen --api messages|responses`: a chat turn rendered in each API, and each API's stream
(as the gateway writes it) read into the same Outcome."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.anthropic_answer import MessagesTranslation
from gateway.anthropic_request import chat_messages
from gateway.anthropic_request import chat_tools as anthropic_tools
from gateway.api_bridge import ChatReader
from gateway.responses_answer import ResponseContext, ResponsesTranslation
from gateway.responses_request import chat_tools as responses_tools
from gateway.responses_request import input_messages
from loadgen.apis import MessagesStream, ResponsesStream, messages_body, responses_body
from loadgen.client import Outcome
from loadgen.workloads import Turn
from tests.gateway.tool_call_chunks import CHUNKS

TOOLS = [
    {"type": "function", "function": {"name": "ls", "description": "list", "parameters": {"type": "object"}}}
]
TURN = Turn(
    messages=[
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a b"},
    ],
    max_tokens=8,
    tools=TOOLS,
)


def test_bodies_translate_back_to_the_same_chat_turn() -> None:
    """What the loadgen sends, the gateway reads back as the workload's own messages and tools."""
    body = messages_body("m", TURN)
    assert body["stream"] is True and body["max_tokens"] == 8
    assert chat_messages(body, strip_billing=True) == TURN.messages
    assert anthropic_tools(body["tools"]) == TOOLS
    body = responses_body("m", TURN)
    assert body["store"] is False and body["instructions"] == "sys"
    assert input_messages(body["input"]) == TURN.messages[1:]
    assert responses_tools(body["tools"]) == TOOLS


def _gateway_stream(translation) -> bytes:
    reader = ChatReader()
    raw = translation.start(100, 0)
    for chunk in CHUNKS:
        raw += translation.deltas(reader.chunk(chunk))
    return raw + asyncio.run(translation.end(reader.result()))


NO_STORE = SimpleNamespace(store=None)  # the responses are not stored (store false)


def test_each_api_stream_is_measured_like_a_chat_stream() -> None:
    streams = [
        (MessagesStream, _gateway_stream(MessagesTranslation("m")), "tool_use"),
        (
            ResponsesStream,
            _gateway_stream(
                ResponsesTranslation(NO_STORE, {"model": "m"}, ResponseContext("anon", False, []))
            ),
            "stop",
        ),
    ]
    for stream_class, raw, reason in streams:
        outcome = Outcome(start=0.0)
        stream = stream_class(outcome)
        for i in range(0, len(raw), 7):  # split anywhere
            stream.feed(raw[i : i + 7], float(i))
        stream.finish()
        assert stream.done, stream_class
        assert outcome.text == "Let me look."
        assert outcome.first_token is not None and len(outcome.itl) == 2  # text, then two argument deltas
        assert (outcome.prompt_tokens, outcome.cached_tokens, outcome.output_tokens) == (100, 64, 7)
        assert outcome.finish_reason == reason
