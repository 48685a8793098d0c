"""The router-side queue per worker (router/room.py), driven through the real Router."""

from __future__ import annotations

from router.config import RouterConfig
from router.protocol import WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router


def room_router(
    capacity_blocks: int, workers: int = 1, max_hold_s: float = 30.0, policy: str = "session_kv"
) -> Router:
    router = Router(policy, RouterConfig(room_hold=True, room_max_hold_s=max_hold_s))
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
    assert router.rooms.held == 0 and router.rooms.held_total == 1 and router.rooms.overdue_total == 0
    assert router.rooms.hold_s == 4.0


def test_a_held_request_goes_at_the_bound_and_then_counts_as_sent() -> None:
    router = room_router(100, max_hold_s=10.0)
    send(router, request("a", "a", 60), 0.0)
    send(router, request("giant", "g", 90, first=1000), 1.0)
    assert router.rooms_deadline() == 11.0
    assert router.release_rooms(10.9) == []
    assert router.release_rooms(11.0) == ["giant"]
    assert router.rooms is not None and router.rooms.overdue_total == 1 and router.rooms_deadline() is None
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
    assert router.rooms.overdue_total == 0  # released by the room the expiry freed, not by the bound
