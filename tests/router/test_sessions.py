"""The session table: bounded, expiring in time order, and findable by the chain a turn extends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.sessions import SessionTable

ops = st.lists(
    st.tuples(st.sampled_from(["touch", "touch", "touch", "expire"]), st.integers(0, 12), st.floats(0, 5)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.floats(1, 20), ops)
def test_bounds_and_expiry_match_a_model(max_sessions: int, ttl: float, steps) -> None:
    table = SessionTable(max_sessions, ttl)
    model: dict[str, float] = {}  # session id -> expires_at
    now = 0.0
    for kind, n, dt in steps:
        now += dt  # time only moves forward
        sid = f"s{n}"
        if kind == "touch":
            if sid not in model and len(model) >= max_sessions:
                del model[min(model, key=lambda k: (model[k], k))]  # the one closest to expiry goes
            model[sid] = now + ttl
            s = table.touch(sid, now)
            assert s.id == sid and s.expires_at == now + ttl
        else:
            expired = table.expire(now)
            gone = [k for k, e in model.items() if e <= now]
            for k in gone:
                del model[k]
            assert expired == len(gone)
        assert len(table) <= max_sessions
        assert {k for k in model} == {f"s{i}" for i in range(13) if f"s{i}" in table}


def test_a_turn_that_extends_a_session_chain_finds_it() -> None:
    table = SessionTable(10, 60.0)
    a = table.touch("a", 0.0)
    table.set_chain(a, [1, 2, 3])
    b = table.touch("b", 0.0)
    table.set_chain(b, [1, 2, 3, 4, 5])
    assert table.find_by_chain([1, 2, 3, 4, 5, 6, 7]) == "b"  # the longest prompt it extends
    assert table.find_by_chain([1, 2, 3, 9]) == "a"
    assert table.find_by_chain([1, 2]) is None
    table.set_chain(a, [1, 2, 3, 9])  # a's next turn: its old tail no longer names it
    assert table.find_by_chain([1, 2, 3, 8]) is None
    table.expire(61.0)
    assert table.find_by_chain([1, 2, 3, 9, 10]) is None
    assert len(table) == 0


def test_zero_capacity_is_refused() -> None:
    with pytest.raises(ValueError):
        SessionTable(0, 1.0)
