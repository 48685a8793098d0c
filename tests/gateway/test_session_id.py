from __future__ import annotations

import pytest

from gateway.errors import ApiError
from gateway.session_id import explicit_session_id, parent_session_id


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
