"""The gateway's waits for the router: admission by session (`SessionHold`) and the room queue
(`RoomHold`), each released by the router's rule, bounded, and handing back its place when it gives up."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.router_holds import RoomHold, SessionHold
from router.config import RouterConfig
from router.protocol import WorkerRegistration
from router.request import RouteRequest
from router.router import Router


def session_router(capacity_blocks: int, max_hold_s: float = 30.0) -> Router:
    router = Router(
        "session_kv",
        RouterConfig(session_admission=True, admission_fill=1.0, admission_max_hold_s=max_hold_s),
    )
    registration = WorkerRegistration("w1", "http://w1", "m", 16, capacity_blocks, "mock", 1, 0.0)
    router.add_worker(registration, time.monotonic())
    return router


def turn(rid: str, session: str, blocks: int) -> RouteRequest:
    return RouteRequest(rid, "m", list(range(1, blocks + 1)), blocks * 16, session)


async def test_session_hold_waits_for_the_resident_session_to_finish() -> None:
    router = session_router(100)
    holds = SessionHold(router, timeout_s=5)
    a = turn("a1", "a", 80)
    await holds.enter(a)  # the pool has room: no wait
    router.pick(a, time.monotonic())
    b = turn("b1", "b", 50)
    waiting = asyncio.create_task(holds.enter(b))
    await asyncio.sleep(0.02)
    assert not waiting.done() and holds.held == 1
    holds.poke()  # nothing finished: still held
    await asyncio.sleep(0.01)
    assert not waiting.done()
    router.on_complete("a1", time.monotonic(), "stop", 5)
    holds.poke()
    await asyncio.wait_for(waiting, 1)
    assert holds.held == 0 and router.admission is not None and router.admission.resident("b")


async def test_session_hold_is_bounded_by_the_router_and_timeouts_hand_back() -> None:
    router = session_router(100, max_hold_s=0.05)
    holds = SessionHold(router, timeout_s=5)
    await holds.enter(turn("a1", "a", 100))
    await asyncio.wait_for(holds.enter(turn("b1", "b", 50)), 1)  # released by the bound's timer
    assert router.admission is not None and router.admission.held == 0
    strict = session_router(100, max_hold_s=60)
    short = SessionHold(strict, timeout_s=0.05)
    await short.enter(turn("a1", "a", 100))
    with pytest.raises(TimeoutError):
        await short.enter(turn("b1", "b", 50))
    assert strict.admission is not None and strict.admission.held == 0 and not strict.admission.resident("b")


async def test_no_session_hold_for_baselines() -> None:
    router = Router("kv_overlap")
    holds = SessionHold(router, timeout_s=0.01)
    await holds.enter(turn("a1", "a", 10_000))
    assert holds.held == 0


async def test_kv_overlaps_dynamo_queue_waits_here_until_a_first_token_and_gives_back_its_pick() -> None:
    """kv_overlap with Dynamo's router queue (`--router-set kv_queue=true`): a turn waits in the
    gateway until the router releases it, already picked (`pick` hands that pick back), and one that
    gives up after its release undoes the pick."""
    router = Router("kv_overlap", RouterConfig(kv_queue=True, kv_affinity_ttl_s=60))
    registration = WorkerRegistration("w1", "http://w1", "m", 16, 1000, "mock", 1, 0.0)
    router.add_worker(registration, time.monotonic())
    holds = SessionHold(router, timeout_s=5)
    a = turn("a1", "a", 10)
    await holds.enter(a)
    router.pick(a, time.monotonic())
    b = turn("b1", "b", 10)
    waiting = asyncio.create_task(holds.enter(b))
    await asyncio.sleep(0.02)
    assert not waiting.done() and holds.held == 1 and router.held_deadline() is not None
    router.on_first_token("a1", time.monotonic())
    holds.poke()
    await asyncio.wait_for(waiting, 1)
    assert router.load.get("b1") is not None  # picked at its release, before the caller asks
    assert router.pick(b, time.monotonic()).worker_id == "w1"
    c = turn("c1", "c", 10)
    waiting = asyncio.create_task(holds.enter(c))
    await asyncio.sleep(0.02)
    router.on_first_token("b1", time.monotonic())
    holds.poke()
    await asyncio.wait_for(waiting, 1)
    holds.leave(c)  # its client went away between the release and the pick
    assert router.load.get("c1") is None


def room_router(capacity_blocks: int, max_hold_s: float = 30.0) -> Router:
    router = Router("session_kv", RouterConfig(room_hold=True, room_max_hold_s=max_hold_s))
    registration = WorkerRegistration("w1", "http://w1", "m", 16, capacity_blocks, "mock", 1, 0.0)
    router.add_worker(registration, time.monotonic())
    return router


async def test_room_hold_sends_a_pick_once_its_worker_has_room() -> None:
    router = room_router(100)
    rooms = RoomHold(router, timeout_s=5)
    a = turn("a1", "a", 80)
    await rooms.enter(a, router.pick(a, time.monotonic()))  # the worker is empty: no wait
    b = turn("b1", "b", 50)
    waiting = asyncio.create_task(rooms.enter(b, router.pick(b, time.monotonic())))
    await asyncio.sleep(0.02)
    assert not waiting.done() and rooms.held == 1
    small = turn("c1", "c", 20)
    await rooms.enter(small, router.pick(small, time.monotonic()))  # it fits: it passes the held one
    rooms.poke()  # nothing finished: still held
    await asyncio.sleep(0.01)
    assert not waiting.done()
    router.on_complete("a1", time.monotonic(), "stop", 5)
    rooms.poke()
    await asyncio.wait_for(waiting, 1)
    assert rooms.held == 0 and router.rooms is not None and router.rooms.held == 0


async def test_room_hold_is_bounded_and_a_cancelled_wait_is_forgotten() -> None:
    router = room_router(100, max_hold_s=0.05)
    rooms = RoomHold(router, timeout_s=5)
    a = turn("a1", "a", 80)
    await rooms.enter(a, router.pick(a, time.monotonic()))
    b = turn("b1", "b", 50)
    await asyncio.wait_for(rooms.enter(b, router.pick(b, time.monotonic())), 1)  # by the bound's timer
    assert router.rooms is not None and router.rooms.stats.overdue_total == 1
    strict = room_router(100, max_hold_s=60)
    held = RoomHold(strict, timeout_s=60)
    await held.enter(a, strict.pick(a, time.monotonic()))
    waiting = asyncio.create_task(held.enter(b, strict.pick(b, time.monotonic())))
    await asyncio.sleep(0.02)
    assert strict.rooms is not None and strict.rooms.held == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert strict.rooms.held == 0 and held.held == 0
