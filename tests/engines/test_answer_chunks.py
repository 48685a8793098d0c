"""A streamed answer's chunks: OpenAI's chat and completions forms, vLLM's `return_token_ids`."""

from __future__ import annotations

import json
from typing import Any

from engines.answer_chunks import AnswerChunks


def _event(data: bytes) -> dict[str, Any]:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[6:])


def test_chat_sends_the_role_first_and_the_prompt_ids_with_it() -> None:
    ids: list[int] = []
    chunks = AnswerChunks("chatcmpl-1", "chat.completion", True, "m", True, ids, [5, 6])
    role = _event(chunks.role())
    assert role["object"] == "chat.completion.chunk" and role["usage"] is None
    assert role["prompt_token_ids"] == [5, 6]
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None,
         "token_ids": []}
    ]  # fmt: skip
    ids += [7, 8]
    text = _event(chunks.text("ab", None))
    assert "prompt_token_ids" not in text
    assert text["choices"][0]["delta"] == {"content": "ab"} and text["choices"][0]["token_ids"] == [7, 8]
    ids.append(9)
    end = _event(chunks.text("", "stop"))
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["token_ids"] == [9]
    usage = _event(chunks.usage({"prompt_tokens": 2}))
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2}


def test_completions_put_the_prompt_ids_on_the_first_chunk_sent() -> None:
    ids = [1]
    chunks = AnswerChunks("cmpl-1", "text_completion", False, "m", False, ids, [5])
    first = _event(chunks.text("a", None))
    assert first["object"] == "text_completion" and "usage" not in first
    assert first["prompt_token_ids"] == [5] and first["choices"][0]["text"] == "a"
    ids.append(2)
    assert "prompt_token_ids" not in _event(chunks.text("b", None))


def test_without_token_ids_no_ids_are_sent() -> None:
    chunks = AnswerChunks("cmpl-1", "text_completion", False, "m", False, None, [5])
    event = _event(chunks.text("a", "length"))
    assert "prompt_token_ids" not in event and "token_ids" not in event["choices"][0]
    assert event["choices"][0]["finish_reason"] == "length"
