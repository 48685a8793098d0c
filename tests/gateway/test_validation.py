from __future__ import annotations

import pytest

from gateway.errors import ApiError
from gateway.validation import DEFAULT_MAX_TOKENS, MAX_DEPTH, parse_turn


def refused(raw: bytes, kind: str = "chat") -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_turn(raw, kind)  # type: ignore[arg-type]
    return info.value


def test_a_plain_chat_body_is_read_out() -> None:
    turn = parse_turn(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,'
        b'"stream_options":{"include_usage":true},"max_tokens":5}',
        "chat",
    )
    assert (turn.model, turn.stream, turn.client_wants_usage, turn.max_tokens) == ("m", True, True, 5)
    assert turn.messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1,2]", None),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model"),
        (b'{"model":"m"}', "messages"),
        (b'{"model":"m","messages":[]}', "messages"),
        (b'{"model":"m","messages":["x"]}', "messages[0]"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}', "n"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}', "stream"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}', "max_tokens"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":true}', "max_tokens"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}', "temperature"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"stop":[1]}', "stop"),
        (b'{"model":7,"messages":[{"role":"user","content":"x"}]}', "model"),
    ],
)
def test_bad_chat_bodies_are_400_naming_the_field(raw: bytes, param: str | None) -> None:
    error = refused(raw)
    assert error.status == 400
    assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_completion_prompts() -> None:
    assert parse_turn(b'{"model":"m","prompt":"abc"}', "completion").prompt == "abc"
    assert parse_turn(b'{"model":"m","prompt":["abc"]}', "completion").prompt == "abc"
    assert parse_turn(b'{"model":"m","prompt":[1,2,3]}', "completion").prompt == [1, 2, 3]
    assert parse_turn(b'{"model":"m","prompt":"a"}', "completion").max_tokens == DEFAULT_MAX_TOKENS
    for bad in (b'{"model":"m"}', b'{"model":"m","prompt":["a","b"]}', b'{"model":"m","prompt":[-1]}'):
        assert refused(bad, "completion").param == "prompt"


@pytest.mark.parametrize("extra", [b"", b',"user":"{{{{[[[["'])  # brackets in a string only add to the count
def test_nesting_is_refused_just_past_the_limit(extra: bytes) -> None:
    def body(depth: int) -> bytes:  # the body object and its messages list are two levels
        value = b"[" * (depth - 3) + b"1" + b"]" * (depth - 3)
        return b'{"model":"m","messages":[{"role":"user","content":"hi","x":' + value + b"}]" + extra + b"}"

    assert parse_turn(body(MAX_DEPTH), "chat").model == "m"
    assert refused(body(MAX_DEPTH + 1)).code == "invalid_json"
