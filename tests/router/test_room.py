"""The router-side queue per worker (router/room.py), driven through the real Router."""

from __future__ import annotations

from router.config import RouterConfig
from router.hold_stats import HoldStats
from router.protocol import WorkerRegistration
from router.request import Decision, RouteRequest
from router.room import RoomQueue
from router.router import Router


def room_router(
    capacity_blocks: int,
    workers: int = 1,
    max_hold_s: float = 30.0,
    policy: str = "session_kv",
    backfill: bool = False,
) -> Router:
    config = RouterConfig(room_hold=True, room_max_hold_s=max_hold_s, room_backfill=backfill)
    router = Router(policy, config)
    for i in range(workers):
        wid = f"w{i + 1}"
        router.add_worker(
            WorkerRegistration(wid, f"http://{wid}", "m", 16, capacity_blocks, "mock", 1, 0.0), 0.0
        )
    return router


def request(rid: str, session: str, blocks: int, first: int = 1) -> RouteRequest:
    return RouteRequest(rid, "m", list(range(first, first + blocks)), blocks * 16, session)


def send(router: Router, req: RouteRequest, now: float) -> tuple[Decision, bool]:
    decision = router.pick(req, now)
    return decision, router.room_offer(req, decision, now)


def test_a_request_without_room_waits_and_smaller_ones_pass_it() -> None:
    router = room_router(100)
    _, sent = send(router, request("a", "a", 60), 0.0)
    assert sent  # the worker is empty
    _, sent = send(router, request("giant", "g", 90, first=1000), 1.0)
    assert not sent and router.rooms is not None and router.rooms.held == 1
    _, sent = send(router, request("b", "b", 30, first=2000), 2.0)
    assert sent  # 60 + 30 fit: it does not queue behind the giant
    assert router.release_rooms(3.0) == []  # nothing completed: still no room
    router.on_complete("a", 4.0, "stop", 1)
    assert router.release_rooms(4.0) == []  # 30 in flight + 90 > 100
    router.on_complete("b", 5.0, "stop", 1)
    assert router.release_rooms(5.0) == ["giant"]
    assert router.rooms.held == 0 and router.rooms.stats == HoldStats(1, 0, 4.0)  # held, overdue, seconds


def test_a_held_request_goes_at_the_bound_and_then_counts_as_sent() -> None:
    router = room_router(100, max_hold_s=10.0)
    send(router, request("a", "a", 60), 0.0)
    send(router, request("giant", "g", 90, first=1000), 1.0)
    assert router.rooms_deadline() == 11.0
    assert router.release_rooms(10.9) == []
    assert router.release_rooms(11.0) == ["giant"]
    assert router.rooms is not None and router.rooms.stats.overdue_total == 1
    assert router.rooms_deadline() is None
    # the giant is sent: its blocks are the worker's now, so a small request waits behind it here
    _, sent = send(router, request("b", "b", 30, first=2000), 12.0)
    assert not sent


def test_held_requests_are_released_oldest_first_as_room_frees() -> None:
    router = room_router(100)
    send(router, request("a", "a", 90), 0.0)
    send(router, request("x", "x", 50, first=1000), 1.0)
    send(router, request("y", "y", 50, first=2000), 2.0)
    send(router, request("z", "z", 50, first=3000), 3.0)
    router.on_complete("a", 4.0, "stop", 1)
    assert router.release_rooms(4.0) == ["x", "y"]  # 100 blocks: the third waits for one of them
    router.cancel_room("z")
    assert router.rooms is not None and router.rooms.held == 0 and router.rooms_deadline() is None


def test_the_requests_held_for_a_worker_that_left_are_released() -> None:
    router = room_router(100)
    send(router, request("a", "a", 90), 0.0)
    send(router, request("b", "b", 50, first=1000), 1.0)
    router.remove_worker("w1")
    assert router.rooms_deadline() == float("-inf")
    assert router.release_rooms(2.0) == ["b"]
    assert router.rooms is not None and router.rooms.held == 0


def test_a_request_larger_than_the_device_is_not_held_on_an_idle_worker() -> None:
    router = room_router(100)
    _, sent = send(router, request("huge", "h", 150), 0.0)
    assert sent  # nothing in flight there: the engine answers it (it refuses what can never fit)


def test_baselines_and_the_default_off_switch_never_hold() -> None:
    for router in (room_router(100, policy="kv_overlap"), room_router(100, policy="cache_aware")):
        send(router, request("a", "a", 90), 0.0)
        _, sent = send(router, request("b", "b", 90, first=1000), 1.0)
        assert sent and router.rooms is None and router.release_rooms(2.0) == []
    off = Router("session_kv", RouterConfig(room_hold=False))
    off.add_worker(WorkerRegistration("w1", "http://w1", "m", 16, 100, "mock", 1, 0.0), 0.0)
    send(off, request("a", "a", 90), 0.0)
    assert send(off, request("b", "b", 90, first=1000), 1.0)[1]


def test_a_send_whose_completion_never_comes_expires_and_frees_its_room() -> None:
    router = room_router(100)
    send(router, request("lost", "a", 90), 0.0)
    assert not send(router, request("b", "b", 50, first=1000), 1.0)[1]
    router.expire(1.0 + router.config.inflight_ttl_s)  # the caller never reported the end of "lost"
    assert router.release_rooms(1.0 + router.config.inflight_ttl_s) == ["b"]
    assert router.rooms is not None and router.rooms.sent_blocks("w1") == 50
    assert router.rooms.stats.overdue_total == 0  # released by the room the expiry freed, not by the bound


# --- EASY backfilling (room_backfill)


def backfill_queue(capacity: int = 100, backfill: bool = True) -> RoomQueue:
    queue = RoomQueue(max_hold_s=60.0, max_held=100, backfill=backfill)
    queue.set_capacity("w", capacity)
    return queue


def test_with_backfill_a_request_passes_a_held_one_only_if_it_delays_it_not() -> None:
    """Known by construction: 50 blocks run until t=10; a 90-block prompt waits for them (it can start
    at 10, with 10 blocks spare beside it). A 20-block request done by 7 passes it; one of 20 blocks
    that runs until 23 would hold its room past 10: it waits; one of 5 blocks fits beside it: passes."""
    queue = backfill_queue()
    assert queue.offer("a", "w", 50, 0.0, expected_s=10.0)
    assert not queue.offer("giant", "w", 90, 1.0, expected_s=20.0)
    assert queue.offer("short", "w", 20, 2.0, expected_s=5.0)  # ends at 7 <= 10
    assert not queue.offer("long", "w", 20, 3.0, expected_s=20.0)  # fits now, ends at 23 > 10
    assert queue.offer("tiny", "w", 5, 3.0, expected_s=100.0)  # fits in the 10 spare blocks
    assert not queue.offer("tiny2", "w", 6, 3.0, expected_s=100.0)  # the spare blocks are taken
    queue.done("short")
    assert queue.release(7.0) == []  # 55 in flight: the giant still does not fit, the long one waits
    queue.done("a")
    assert queue.release(10.0) == ["giant"]  # 5 + 90: the long one now waits for room itself
    assert queue.stats.overdue_total == 0 and queue.held == 2


def test_without_backfill_every_request_that_fits_passes_a_held_one() -> None:
    queue = backfill_queue(backfill=False)
    assert queue.offer("a", "w", 50, 0.0, expected_s=10.0)
    assert not queue.offer("giant", "w", 90, 1.0, expected_s=20.0)
    assert queue.offer("long", "w", 20, 3.0, expected_s=20.0)
    queue.done("a")
    assert queue.release(10.0) == []  # 20 in flight + 90: the giant waits for the long one


def test_a_late_request_counts_as_ending_now_and_an_unknown_one_never() -> None:
    queue = backfill_queue()
    assert queue.offer("late", "w", 50, 0.0, expected_s=1.0)  # still running at t=5
    assert not queue.offer("giant", "w", 90, 2.0)
    # the giant's start is now (5): nothing is done before it, only the spare 10 blocks can be taken
    assert not queue.offer("quick", "w", 20, 5.0, expected_s=0.5)
    unknown = backfill_queue()
    assert unknown.offer("a", "w", 50, 0.0)  # no expected run time: it may run forever
    assert not unknown.offer("giant", "w", 90, 1.0)
    assert not unknown.offer("quick", "w", 20, 2.0, expected_s=0.001)
    assert unknown.offer("tiny", "w", 10, 2.0)  # beside the giant whenever it starts


def test_backfill_keeps_the_bound_and_reserves_only_the_oldest_held_request() -> None:
    queue = backfill_queue()
    assert queue.offer("a", "w", 50, 0.0, expected_s=100.0)
    assert not queue.offer("giant", "w", 90, 1.0, expected_s=20.0)
    assert not queue.offer("second", "w", 60, 2.0, expected_s=1.0)  # does not fit: held behind it
    assert not queue.offer("long", "w", 20, 3.0, expected_s=200.0)
    assert queue.release(60.0) == []
    assert queue.release(61.0) == ["giant"]  # by the bound, whatever the room
    assert queue.release(62.0) == ["second"]
    assert queue.release(63.0) == ["long"]
    assert queue.stats.overdue_total == 3


def test_the_router_learns_each_sessions_run_time_for_backfill() -> None:
    """Session x's turns take 1 s, y's 30 s (the pool's average of those two, 9.7 s, goes to a new
    session). With a 90-block prompt waiting for a's 50 blocks (expected to end at 40.7), x's next turn
    passes it and y's waits."""
    router = room_router(100, backfill=True)
    send(router, request("x1", "x", 10), 0.0)
    send(router, request("y1", "y", 10, first=500), 0.0)
    router.on_complete("x1", 1.0, "stop", 1)
    router.on_complete("y1", 30.0, "stop", 1)
    assert send(router, request("a", "a", 50, first=1000), 31.0)[1]
    assert not send(router, request("g", "g", 90, first=2000), 32.0)[1]
    assert send(router, request("x2", "x", 20, first=3000), 33.0)[1]  # ends at 34 <= 40.7
    assert not send(router, request("y2", "y", 20, first=4000), 33.0)[1]  # ends at 63
    router.on_complete("x2", 34.0, "stop", 1)
    router.on_complete("a", 40.0, "stop", 1)
    assert router.release_rooms(40.0) == ["g"]
