"""router/policies/live_contexts.py: the live sessions' contexts per worker."""

from __future__ import annotations

import random

from router.policies.live_contexts import LiveContext, LiveContexts


def test_a_turn_replaces_its_sessions_context_and_moves_its_blocks() -> None:
    live = LiveContexts(live_s=60.0, max_sessions=10)
    live.picked("a", "w0", 100, now=1.0)
    live.picked("b", "w0", 50, now=2.0)
    assert live.blocks_on("w0") == 150
    live.picked("a", "w1", 120, now=3.0)  # the session moved, its context grew
    assert live.get("a") == LiveContext("w1", 120, 3.0)
    assert (live.blocks_on("w0"), live.blocks_on("w1")) == (50, 120)
    assert live.blocks_on("w9") == 0
    assert list(live) == ["a", "b"] and "a" in live and "c" not in live


def test_a_session_expires_after_its_last_pick_not_its_first() -> None:
    live = LiveContexts(live_s=10.0, max_sessions=10)
    live.picked("a", "w0", 10, now=0.0)
    live.picked("b", "w0", 20, now=1.0)
    live.picked("a", "w0", 30, now=8.0)  # a came back: its first pick's expiry must not drop it
    live.expire(now=11.5)
    assert list(live) == ["a"] and live.blocks_on("w0") == 30
    live.expire(now=18.5)
    assert len(live) == 0 and live.blocks_on("w0") == 0


def test_the_first_recorded_session_goes_when_full() -> None:
    live = LiveContexts(live_s=60.0, max_sessions=2)
    live.picked("a", "w0", 10, now=0.0)
    live.picked("b", "w1", 20, now=1.0)
    live.picked("c", "w1", 40, now=2.0)
    assert list(live) == ["b", "c"]
    assert (live.blocks_on("w0"), live.blocks_on("w1")) == (0, 60)


def test_a_removed_worker_takes_its_sessions_with_it() -> None:
    live = LiveContexts(live_s=60.0, max_sessions=10)
    live.picked("a", "w0", 10, now=0.0)
    live.picked("b", "w1", 20, now=1.0)
    live.remove_worker("w0")
    assert list(live) == ["b"] and live.blocks_on("w0") == 0
    live.expire(now=100.0)  # a's entry in the pick order finds nothing to forget
    assert len(live) == 0


def test_blocks_per_worker_are_the_sum_of_the_live_contexts_there() -> None:
    """Random picks, expiries and removals against a plain recount from the live contexts."""
    rng = random.Random(7)
    live = LiveContexts(live_s=5.0, max_sessions=6)
    workers = ["w0", "w1", "w2"]
    now = 0.0
    for _ in range(2_000):
        now += rng.random()
        action = rng.random()
        if action < 0.8:
            live.picked(f"s{rng.randrange(10)}", rng.choice(workers), rng.randrange(1, 100), now)
        elif action < 0.97:
            live.expire(now)
        else:
            live.remove_worker(rng.choice(workers))
        assert len(live) <= 6
        contexts = [c for c in (live.get(s) for s in live) if c is not None]
        for w in workers:
            assert live.blocks_on(w) == sum(c.blocks for c in contexts if c.worker_id == w)
