"""The router queue for an overloaded pool (router/overload_queue.py), driven through the real Router:
a turn waits unpicked while every worker is busy, and the shortest predicted prefill leaves first."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.overload_queue import OverloadQueue
from router.protocol import BlockStored, KvEventBatch, WorkerRegistration
from router.request import RouteRequest
from router.router import Router

BS = 16


def make(workers: int = 2, memory_hold: bool = False, **config: object) -> Router:
    settings = RouterConfig(overload_queue=True, memory_hold=memory_hold, **config)
    router = Router(policy="session_kv", config=settings, seed=1)
    for i in range(workers):
        router.add_worker(WorkerRegistration(f"w{i}", f"http://w{i}", "m", BS, 1000, "mock", 1, 0.0), 0.0)
    return router


def turn(rid: str, blocks: int, base: int) -> RouteRequest:
    return RouteRequest(
        rid, "m", list(range(base, base + blocks)), blocks * BS, rid, expected_output_tokens=10
    )


def send(router: Router, request: RouteRequest, now: float) -> str:
    """Admit and pick the turn (it must not wait): its worker."""
    assert router.admit(request, now)
    return router.pick(request, now).worker_id


def test_turns_wait_while_every_worker_has_prefill_in_flight_and_the_shortest_goes_first() -> None:
    router = make()
    queue = router.overload
    assert queue is not None
    first = send(router, turn("a", 100, 0), 0.0)
    second = send(router, turn("b", 100, 1_000), 0.0)
    assert {first, second} == {"w0", "w1"}  # one prefill in flight on each: both busy now
    assert not router.admit(turn("long", 80, 2_000), 0.1)
    assert not router.admit(turn("short", 10, 3_000), 0.2)
    assert queue.held == 2 and router.held_deadline() == pytest.approx(30.1)
    assert router.release_held(0.3) == []  # nobody is free yet
    # a's first token frees its worker: one turn goes, the shortest prefill though it came later
    router.on_first_token("a", 0.5)
    assert router.release_held(0.5) == ["short"]
    # until it is picked it keeps the free worker: no second release, and a new turn still waits
    assert router.release_held(0.55) == []
    assert not router.admit(turn("new", 5, 4_000), 0.56)
    assert router.pick(turn("short", 10, 3_000), 0.6).worker_id == first
    router.on_first_token("b", 0.7)
    assert router.release_held(0.7) == ["new"]  # 5 blocks to prefill, before long's 80
    assert queue.held == 1 and queue.stats.held_total == 3 and queue.stats.overdue_total == 0


def test_a_cached_prefix_is_no_prefill() -> None:
    router = make(workers=1)
    send(router, turn("a", 200, 0), 0.0)
    router.on_first_token("a", 0.1)
    router.on_complete("a", 0.2, "stop", 10)
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.2, [BlockStored(list(range(200)))]), 0.2)
    send(router, turn("b", 100, 5_000), 0.3)
    assert not router.admit(turn("fresh", 50, 10_000), 0.4)
    assert not router.admit(turn("a", 220, 0), 0.5)  # a's next turn: 20 blocks beyond its cached 200
    router.on_first_token("b", 0.6)
    assert router.release_held(0.6) == ["a"]


def test_the_bound_lets_any_turn_go_and_a_cancelled_one_is_forgotten() -> None:
    router = make(workers=1, overload_max_hold_s=5.0)
    send(router, turn("a", 200, 0), 0.0)
    assert not router.admit(turn("x", 50, 10_000), 1.0)
    assert not router.admit(turn("y", 60, 20_000), 2.0)
    router.cancel_held("y", "y", 2.5)  # its client went away: forgotten
    assert router.held_deadline() == pytest.approx(6.0)
    assert router.release_held(6.0) == ["x"]  # the bound: worker still busy
    assert router.overload is not None and router.overload.stats.overdue_total == 1
    assert router.held_deadline() is None


def test_memory_busy_queues_only_while_every_worker_holds_a_pick_for_memory() -> None:
    router = make(overload_busy_memory=True, memory_hold=True)
    hold = router.memory_hold
    assert hold is not None
    send(router, turn("a", 100, 0), 0.0)
    send(router, turn("b", 100, 1_000), 0.0)
    assert router.admit(turn("c", 100, 2_000), 0.1)  # prefill in flight everywhere, but no memory hold
    for wid in ("w0", "w1"):  # a pick held for memory on each worker (a predicted wait of 10 s)
        assert not hold.offer(f"held-{wid}", wid, list(range(9_000, 9_100)), 10_000.0, 0.15)
    assert not router.admit(turn("d", 100, 3_000), 0.2)
    assert hold.send("held-w1", 0.3)  # w1's held pick goes: w1 is free
    assert router.release_held(0.3) == ["d"]


def test_off_by_default_and_bad_settings_are_refused() -> None:
    assert Router(policy="session_kv").overload is None
    assert Router(policy="kv_overlap", config=RouterConfig(overload_queue=True)).overload is None
    with pytest.raises(ValueError, match="bounds"):
        RouterConfig(overload_max_hold_s=-1.0)
    with pytest.raises(ValueError):
        OverloadQueue(1.0, 1, True, False, -1)


def test_fcfs_order_keeps_arrivals_in_order() -> None:
    router = make(workers=1, overload_fcfs=True)
    send(router, turn("a", 100, 0), 0.0)
    assert not router.admit(turn("long", 80, 2_000), 0.1)
    assert not router.admit(turn("short", 10, 3_000), 0.2)
    router.on_first_token("a", 0.5)
    assert router.release_held(0.5) == ["long"]


def test_the_bound_releases_at_the_deadline_it_names() -> None:
    """At exactly `held_deadline()` the held turn goes, whatever the float rounding: a timer armed
    there that found nothing would re-arm at the same instant for ever."""
    arrival, bound = 99.087, 30.0
    assert (arrival + bound) - bound < arrival  # the rounding this guards against
    router = make(workers=1, overload_max_hold_s=bound)
    send(router, turn("a", 200, 0), 0.0)
    assert not router.admit(turn("x", 50, 10_000), arrival)
    deadline = router.held_deadline()
    assert deadline == arrival + bound
    assert router.release_held(deadline) == ["x"]
