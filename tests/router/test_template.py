"""The prompt tokens of real model families' chat templates equal transformers'
`apply_chat_template(..., tokenize=True)` on multi-turn conversations with tool calls and results,
given the messages as vLLM hands them to transformers; turn by turn through one segment cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from router.chat import HFTokenizer, SegmentCache, encode_chat
from router.template import ChatOptions, TemplateError
from tests.router.chat_families import FAMILIES, write_tokenizer_folder

transformers = pytest.importorskip("transformers")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {
    "id": "call12345",  # Mistral's template wants 9 alphanumerics
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call12345", "content": [{"type": "text", "text": "sunny, 21 degrees"}]},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
    {"role": "user", "content": "And in Rome?"},
]
PLAIN_CHAT = [  # for templates without system or tool roles
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "It is sunny, 21 degrees."},
    {"role": "user", "content": [{"type": "text", "text": "And in Rome?"}]},
]
NO_TOOLS = {"gemma-2-2b-it"}


def as_vllm_passes_them(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Written out by hand: text parts joined, content None as "", tool call arguments as objects."""
    out = copy.deepcopy(messages)
    for m in out:
        if m["content"] is None:
            m["content"] = ""
        elif isinstance(m["content"], list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def reference_tokens(reference: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = reference.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns an encoding


def turns(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each request of the conversation: the history up to a user message or a tool result."""
    return [messages[: i + 1] for i, m in enumerate(messages) if m["role"] in ("user", "tool")]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, write_tokenizer_folder(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_tokens_equal_transformers_turn_by_turn(family: tuple[str, Path], kwargs: dict[str, Any]) -> None:
    name, folder = family
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = HFTokenizer.from_path(folder)
    assert ours.has_template
    cache = SegmentCache(ours)
    chat, tools = (PLAIN_CHAT, None) if name in NO_TOOLS else (TOOL_CHAT, TOOLS)
    options = ChatOptions(kwargs=kwargs)
    for messages in turns(chat):
        expected = reference_tokens(
            reference, as_vllm_passes_them(messages), tools=tools, add_generation_prompt=True, **kwargs
        )
        tokens = encode_chat(messages, ours, tools, cache, options)
        assert tokens == expected, (name, len(messages), ours.decode(tokens), reference.decode(expected))
        assert tokens == ours.encode(ours.render(messages, tools, options))  # pieces == whole text
    assert cache.hits > 0  # later turns reuse the earlier turns' pieces


def test_a_template_that_rewrites_history_still_tokenizes_exactly(tmp_path: Path) -> None:
    """Qwen3 drops the reasoning of assistant turns before the last user query: the second request's
    pieces differ from the first's mid-conversation, and the cache must not reuse the stale ones."""
    folder = write_tokenizer_folder("qwen3-0.6b", tmp_path / "qwen3")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = HFTokenizer.from_path(folder)
    cache = SegmentCache(ours)
    first = [
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": "<think>\n6*7 is 42.\n</think>\n\nIt is 42."},
        {"role": "tool", "content": "ok"},
    ]
    second = [*first, {"role": "assistant", "content": "Done."}, {"role": "user", "content": "Thanks"}]
    for messages in (first, second):
        expected = reference_tokens(reference, messages, add_generation_prompt=True)
        assert encode_chat(messages, ours, None, cache) == expected
    assert "6*7" in ours.render(first) and "6*7" not in ours.render(second)


def test_template_errors_name_the_template_message(tmp_path: Path) -> None:
    ours = HFTokenizer.from_path(write_tokenizer_folder("gemma-2-2b-it", tmp_path / "gemma"))
    with pytest.raises(TemplateError, match="System role not supported"):
        encode_chat([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], ours)
    with pytest.raises(TemplateError, match="alternate"):
        encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ours)
    with pytest.raises(TemplateError, match="only text content parts"):
        encode_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ours)


def test_the_sandbox_refuses_escapes(tmp_path: Path) -> None:
    folder = write_tokenizer_folder("qwen2.5-7b-instruct", tmp_path / "qwen")
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="template failed"):
        encode_chat([{"role": "user", "content": "hi"}], HFTokenizer.from_path(folder))


def test_request_options_are_validated() -> None:
    assert ChatOptions.from_body({}).add_generation_prompt is True
    options = ChatOptions.from_body({"chat_template_kwargs": {"enable_thinking": False, "messages": []}})
    assert options.kwargs == {"enable_thinking": False}  # our own names cannot be replaced
    for body in (
        {"add_generation_prompt": "yes"},
        {"chat_template_kwargs": [1]},
        {"add_generation_prompt": True, "continue_final_message": True},
        {"documents": "x"},
    ):
        with pytest.raises(TemplateError):
            ChatOptions.from_body(body)


def test_continue_final_message_equals_transformers(tmp_path: Path) -> None:
    folder = write_tokenizer_folder("llama-3.1-8b-instruct", tmp_path / "llama")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = HFTokenizer.from_path(folder)
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue and"}]
    expected = reference_tokens(reference, messages, continue_final_message=True)
    options = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    assert encode_chat(messages, ours, None, None, options) == expected
