from __future__ import annotations

import random

import pytest

from router.admission import SessionAdmission
from router.config import RouterConfig
from router.hold_stats import HoldStats
from router.protocol import WorkerRegistration
from router.request import RouteRequest
from router.router import Router


def pool(capacity: int = 1000, fill: float = 1.0, max_hold_s: float = 30.0) -> SessionAdmission:
    adm = SessionAdmission(fill, max_hold_s, max_held=100)
    adm.set_capacity(capacity)
    return adm


def test_no_hold_without_pressure() -> None:
    adm = pool()
    for i in range(10):
        assert adm.offer(f"r{i}", f"s{i}", 100, False, 0, now=0.0)
    assert adm.footprint == 1000 and adm.held == 0


def test_holds_under_pressure_and_resident_sessions_pass() -> None:
    adm = pool()
    assert adm.offer("a1", "a", 600, False, 0, 0.0)
    assert adm.offer("b1", "b", 300, False, 0, 0.0)
    assert not adm.offer("c1", "c", 200, False, 0, 0.0)  # 600 + 300 + 200 > 1000
    adm.done("a", pinned_until=10.0, now=1.0)  # a is expected back from its tool call
    # a's next turn is resident: admitted, and it grows past the pool (its own context, kept)
    assert adm.offer("a2", "a", 800, True, 0, 2.0)
    assert adm.footprint == 1100
    assert adm.release(3.0) == [] and adm.held == 1


def test_release_order_tool_loop_then_least_service_then_arrival() -> None:
    adm = pool()
    assert adm.offer("big", "big", 1000, False, 0, 0.0)
    assert not adm.offer("new", "n", 100, False, 0, 1.0)
    assert not adm.offer("heavy", "h", 100, True, 50_000, 2.0)
    assert not adm.offer("light", "l", 100, True, 10, 3.0)
    assert not adm.offer("light2", "l2", 100, True, 10, 4.0)
    adm.done("big", pinned_until=float("-inf"), now=5.0)  # finished without a tool call: it leaves
    assert adm.release(5.0) == ["light", "light2", "heavy", "new"]
    assert adm.footprint == 400 and adm.held == 0


def test_head_waits_until_it_fits_and_pins_expire() -> None:
    adm = pool()
    assert adm.offer("a1", "a", 700, False, 0, 0.0)
    assert not adm.offer("b1", "b", 500, True, 0, 1.0)
    assert not adm.offer("c1", "c", 100, False, 0, 1.0)  # fits, but does not overtake b
    adm.done("a", pinned_until=20.0, now=2.0)
    assert adm.release(2.0) == []  # a is pinned: its context stays resident
    assert adm.next_deadline() == 20.0
    assert adm.release(20.0) == ["b1", "c1"]
    assert adm.stats == HoldStats(held_total=2, overdue_total=0, hold_s=38.0)  # released by room


def test_a_resident_with_more_service_yields_at_its_tool_boundary() -> None:
    adm = pool()
    assert adm.offer("a1", "a", 600, False, 5000, 0.0)
    assert adm.offer("c1", "c", 300, False, 0, 0.0)
    assert not adm.offer("b1", "b", 600, False, 100, 1.0)
    adm.done("c", pinned_until=30.0, now=2.0)  # c has less service than b: it keeps its place
    assert adm.resident("c") and adm.release(2.0) == []
    adm.done("a", pinned_until=30.0, now=3.0)  # a has more: it leaves, though pinned
    assert not adm.resident("a") and adm.release(3.0) == ["b1"]
    assert not adm.offer("a2", "a", 610, True, 6000, 4.0)  # and its next turn queues
    fixed = SessionAdmission(1.0, 30.0, 100, yield_to_held=False)
    fixed.set_capacity(1000)
    assert fixed.offer("a1", "a", 600, False, 5000, 0.0)
    assert not fixed.offer("b1", "b", 600, False, 100, 1.0)
    fixed.done("a", pinned_until=30.0, now=3.0)
    assert fixed.resident("a") and fixed.release(3.0) == []


def test_hold_is_bounded() -> None:
    adm = pool(max_hold_s=30.0)
    assert adm.offer("a1", "a", 1000, False, 0, 0.0)
    assert not adm.offer("b1", "b", 500, False, 0, 5.0)
    assert adm.next_deadline() == 35.0
    assert adm.release(34.9) == []
    assert adm.release(35.0) == ["b1"]
    assert adm.stats == HoldStats(held_total=1, overdue_total=1, hold_s=30.0)


def test_cancelled_turn_is_never_released() -> None:
    adm = pool()
    assert adm.offer("a1", "a", 1000, False, 0, 0.0)
    assert not adm.offer("b1", "b", 10, False, 0, 0.0)
    assert adm.cancel("b1") and not adm.cancel("b1")
    adm.done("a", float("-inf"), 1.0)
    assert adm.release(1.0) == [] and adm.footprint == 0


def test_conservation_every_held_turn_is_released_once() -> None:
    """Random sessions, turns, completions and pins: every turn starts exactly once, within the hold
    bound, and the footprint returns to zero when everything is done."""
    rng = random.Random(7)
    adm = pool(capacity=5000, fill=0.9, max_hold_s=20.0)
    session_of: dict[str, str] = {}
    offered: dict[str, float] = {}
    started: dict[str, float] = {}
    running: list[str] = []  # started, not done

    def start(rids: list[str], now: float) -> None:
        for rid in rids:
            assert rid not in started
            started[rid] = now
            running.append(rid)

    def advance(to: float) -> float:
        """Call release at each deadline before `to`, as the gateway's and the simulator's timers do."""
        while (deadline := adm.next_deadline()) is not None and deadline <= to:
            start(adm.release(deadline), deadline)
        start(adm.release(to), to)
        return to

    now = 0.0
    for i in range(3000):
        now = advance(now + rng.expovariate(5.0))
        if running and rng.random() < 0.5:
            rid = running.pop(rng.randrange(len(running)))
            pin = now + rng.uniform(0, 15) if rng.random() < 0.7 else float("-inf")
            adm.done(session_of[rid], pin, now)
            start(adm.release(now), now)
        sid = f"s{rng.randrange(60)}"
        if any(session_of[r] == sid for r in offered if r not in started or r in running):
            continue  # closed loop: one turn per session at a time
        rid = f"r{i}"
        session_of[rid] = sid
        offered[rid] = now
        if adm.offer(rid, sid, rng.randrange(100, 1500), rng.random() < 0.5, rng.randrange(10_000), now):
            start([rid], now)
    assert adm.stats.held_total > 0  # the case did put the pool under pressure
    while running:
        now = advance(now + 1.0)
        adm.done(session_of[running.pop()], float("-inf"), now)
        start(adm.release(now), now)
    now = advance(now + 100.0)
    assert set(started) == set(offered)
    assert max(started[r] - offered[r] for r in offered) <= 20.0 + 1e-9
    while running:
        adm.done(session_of[running.pop()], float("-inf"), now)
    adm.release(now + 1000.0)
    assert adm.held == 0 and adm.footprint == 0


def router(capacity_blocks: int, **config: float | bool) -> Router:
    config.setdefault("session_admission", True)  # the tests are of admission itself: on whatever the default
    r = Router("session_kv", RouterConfig(**config))  # type: ignore[arg-type]
    r.add_worker(WorkerRegistration("w0", "http://w0", "m", 16, capacity_blocks, "mock", 1, 0.0), 0.0)
    return r


def turn(rid: str, sid: str, blocks: int, tool: bool = False) -> RouteRequest:
    return RouteRequest(rid, "m", list(range(1, blocks + 1)), blocks * 16, sid, tool_call_pending=tool)


def test_router_holds_a_session_until_a_resident_one_finishes() -> None:
    r = router(100, admission_fill=1.0, admission_max_hold_s=30.0)
    a = turn("a1", "a", 80)
    assert r.admit(a, 0.0)
    r.pick(a, 0.0)
    b = turn("b1", "b", 50)
    assert not r.admit(b, 0.1)
    assert r.held_deadline() == pytest.approx(30.1)
    r.on_complete("a1", 1.0, "stop", 10)  # no tool call: a leaves the pool's resident set
    assert r.release_held(1.0) == ["b1"]
    assert r.pick(b, 1.0).worker_id == "w0"


def test_router_pinned_session_stays_resident_and_baselines_never_hold() -> None:
    r = router(100, admission_fill=1.0)
    a = turn("a1", "a", 80)
    assert r.admit(a, 0.0)
    r.pick(a, 0.0)
    hint = r.on_complete("a1", 1.0, "tool_calls", 10)
    assert hint is not None
    assert not r.admit(turn("b1", "b", 50), 1.1)  # a's pinned context holds the pool
    assert r.admit(turn("a2", "a", 90, tool=True), 2.0)  # a's next turn is not held
    r.cancel_held("b1", "b", 2.0)
    assert r.release_held(200.0) == []
    off = router(100, session_admission=False)
    assert off.admission is None and off.admit(turn("x", "x", 500), 0.0)
    baseline = Router("kv_overlap")
    assert baseline.admission is None and baseline.admit(turn("x", "x", 500), 0.0)
