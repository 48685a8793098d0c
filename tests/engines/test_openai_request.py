"""The worker's request parsing: each field's check, in the order the checks run, and the result."""

from __future__ import annotations

from typing import Any

import pytest

from engines.openai_request import RequestError, RequestParser
from router.chat import ByteTokenizer
from router.protocol import MAX_PRIORITY

PROMPT = [1, 2, 3, 4]


def parser() -> RequestParser:
    return RequestParser(ByteTokenizer(), max_model_len=64, default_max_tokens=8)


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "kvgate": {"prompt_token_ids": PROMPT}, **fields}


def test_a_valid_request_carries_every_field() -> None:
    body = completion(
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        ignore_eos=True,
        top_p=0.5,
        temperature=0.0,
        max_tokens=100,
        cache_salt="salt",
        priority=-3,
        stop=["\n"],
    )
    body["kvgate"] |= {"request_id": "r1", "session_id": "s1"}
    parsed = parser().completion(body)
    assert parsed.prompt_token_ids == PROMPT
    assert (parsed.stream, parsed.include_usage) == (True, True)
    assert (parsed.request_id, parsed.session_id, parsed.cache_salt, parsed.priority) == (
        "r1",
        "s1",
        "salt",
        -3,
    )
    assert parsed.stop == ["\n"]
    sampling = parsed.sampling
    assert (sampling.seed, sampling.ignore_eos, sampling.top_p, sampling.temperature) == (7, True, 0.5, 0.0)
    assert sampling.max_tokens == 64 - len(PROMPT)  # cut to the context left


def test_defaults() -> None:
    parsed = parser().completion(completion())
    assert (parsed.stream, parsed.include_usage, parsed.session_id, parsed.cache_salt) == (
        False,
        False,
        None,
        None,
    )
    assert parsed.priority == 0 and len(parsed.request_id) == 32  # a fresh uuid
    assert parsed.sampling.max_tokens == 16  # the completions API's default
    assert parser().chat({"messages": [{"role": "user", "content": "hi"}]}).sampling.max_tokens == 8


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": 3}, "model"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": [1]}, "stream_options"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 3}, "temperature"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"cache_salt": "x" * 257}, "cache_salt"),
        ({"priority": MAX_PRIORITY + 1}, "priority"),
        ({"priority": True}, "priority"),
        # two bad fields: the first checked is named
        ({"stream": 1, "seed": "x"}, "stream"),
        ({"seed": "x", "priority": "x"}, "seed"),
        ({"top_p": 0, "cache_salt": 5}, "top_p"),
        ({"cache_salt": 5, "priority": "x"}, "cache_salt"),
    ],
)
def test_a_bad_field_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as caught:
        parser().completion(completion(**fields))
    assert caught.value.param == param and caught.value.status == 400


@pytest.mark.parametrize("name", ["request_id", "session_id"])
def test_the_gateways_ids_are_bounded(name: str) -> None:
    body = completion()
    body["kvgate"][name] = "x" * 257
    with pytest.raises(RequestError, match="1 to 256") as caught:
        parser().completion(body)
    assert caught.value.param == f"kvgate.{name}"


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    body = completion()
    body["kvgate"]["prompt_token_ids"] = list(range(64))
    with pytest.raises(RequestError) as caught:
        parser().completion(body)
    assert caught.value.code == "context_length_exceeded"
