from __future__ import annotations

import random
from urllib.parse import quote

import pytest

from gateway.errors import ApiError
from gateway.session_id import _HEADER_SAFE, explicit_session_id, header_value, parent_session_id


def test_headers_come_first_in_reference_order() -> None:
    headers = {"x-dynamo-session-id": "dyn", "x-claude-code-session-id": "cc", "session_id": "codex"}
    assert explicit_session_id(headers, {"user": "u"}) == "cc"
    assert explicit_session_id({"x-dynamo-session-id": "dyn"}, {"user": "u"}) == "dyn"


def test_body_fields_in_order_then_none() -> None:
    body = {"user": "u", "metadata": {"user_id": "mu", "session_id": "ms"}, "prompt_cache_key": "pk"}
    assert explicit_session_id({}, body) == "pk"
    del body["prompt_cache_key"]
    assert explicit_session_id({}, body) == "ms"
    assert explicit_session_id({}, {"user": "u", "metadata": {"user_id": "mu"}}) == "mu"
    assert explicit_session_id({}, {"user": "u"}) == "u"
    assert explicit_session_id({"x-session-id": "  "}, {"user": 5, "metadata": "x"}) is None


def test_long_ids_are_cut() -> None:
    assert len(explicit_session_id({"x-session-id": "s" * 5000}, {}) or "") == 256


def test_a_sub_agent_names_its_parent_in_a_header() -> None:
    assert parent_session_id({"x-dynamo-parent-session-id": " root "}) == "root"
    assert parent_session_id({"x-parent-session-id": "p", "x-session-id": "child"}) == "p"
    assert parent_session_id({"x-session-id": "child"}) is None
    with pytest.raises(ApiError):
        parent_session_id({"x-dynamo-parent-session-id": "bad\x00id"})


def test_a_header_value_is_the_id_percent_encoded_beyond_printable_ascii() -> None:
    """The fast path for ids with nothing to encode returns what `quote` would."""
    rng = random.Random(7)
    alphabet = 'az09-_.~:/+=% \t\x7f\x80é漢\U0001f600"\\'
    ids = ["", "sess-1", "a b", "100%", "tab\tid", "é", "~x/y+z=", "\x7f"]
    ids += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    for session_id in ids:
        assert header_value(session_id) == quote(session_id, safe=_HEADER_SAFE), session_id
    assert header_value("sess-1") == "sess-1" and header_value("a b") == "a%20b"
