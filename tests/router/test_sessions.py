"""The session table: bounded, expiring in time order, and findable by the chain a turn extends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.sessions import Session, SessionTable

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


def restored(sid: str, expires_at: float, chain: list[int]) -> Session:
    s = Session(sid)
    s.worker_id, s.chain, s.expires_at = "w0", chain, expires_at
    return s


def test_restore_keeps_live_sessions_and_the_bound() -> None:
    table = SessionTable(2, 10.0)
    live = table.touch("live", 0.0)  # expires at 10
    table.set_chain(live, [1, 2])
    assert not table.restore(restored("live", 50.0, [9]))  # the live entry is newer than a snapshot
    assert table.get("live") is live
    assert table.restore(restored("old", 30.0, [1, 2, 3]))
    assert table.find_by_chain([1, 2, 3, 4]) == "old"
    assert table.find_by_chain([1, 2, 5]) == "live"
    # full: one that would expire first is not taken; a later one pushes out the closest to expiry
    assert not table.restore(restored("sooner", 5.0, []))
    assert table.restore(restored("later", 40.0, [7]))
    assert "live" not in table and {"old", "later"} == {s.id for s in table.values()}
    assert table.expire(35.0) == 1 and [s.id for s in table.values()] == ["later"]


def test_restore_does_not_take_a_live_sessions_tail() -> None:
    table = SessionTable(4, 10.0)
    live = table.touch("live", 0.0)
    table.set_chain(live, [1, 2])
    assert table.restore(restored("old", 5.0, [1, 2]))  # the same prompt, seen by another replica
    assert table.find_by_chain([1, 2, 3]) == "live"


def test_the_table_stays_under_its_byte_cap_dropping_the_least_recently_used() -> None:
    from router.sessions import BYTES_PER_HASH, SESSION_BYTES

    cap = 10 * (SESSION_BYTES + 100 * BYTES_PER_HASH)
    table = SessionTable(max_sessions=1000, ttl_s=60.0, max_bytes=cap)
    for i in range(50):
        table.set_chain(table.touch(f"s{i}", float(i)), list(range(i * 1000, i * 1000 + 100)))
        assert table.bytes <= cap
    assert len(table) == 10 and "s49" in table and "s39" not in table  # the newest ten
    # one chain larger than the whole cap: the session stays, without its chain
    big = table.touch("big", 100.0)
    table.set_chain(big, list(range(10_000)))
    assert table.bytes <= cap and big.chain == [] and "big" in table
    table.discard("big")
    assert "big" not in table


def test_a_session_touched_twice_at_once_is_not_dropped_for_its_own_chain() -> None:
    """Two touches at one time leave two equal expiry entries; a chain over the byte cap still drops
    the others first, never the session it is set on."""
    from router.sessions import BYTES_PER_HASH, SESSION_BYTES

    table = SessionTable(max_sessions=10, ttl_s=60.0, max_bytes=2 * SESSION_BYTES + 99 * BYTES_PER_HASH)
    a = table.touch("a", 0.0)
    assert table.touch("a", 0.0) is a
    table.touch("b", 1.0)
    table.set_chain(a, list(range(100)))  # over the cap with b: b goes, though a expires first
    assert "a" in table and "b" not in table and a.chain == list(range(100))
    assert table.expire(60.0) == 1 and len(table) == 0
