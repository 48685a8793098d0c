from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission, NoWorker, QueueFull
from router.request import Decision


def first_free(order: list[str]):
    def route(exclude: frozenset[str]) -> Decision | None:
        for worker in order:
            if worker not in exclude:
                return Decision(worker, 0, 0.0, "test")
        return None

    return route


async def test_limits_then_queue_by_tool_loop_and_attained_service() -> None:
    admission = Admission(queue_bound=3, queue_timeout_s=5)
    admission.set_limit("w1", 1)
    route = first_free(["w1"])
    everyone = frozenset({"w1"})
    first = await admission.admit(route, everyone, "busy", False)
    assert first.worker_id == "w1" and admission.inflight("w1") == 1
    admission.add_service("long", 10_000)
    admission.add_service("short", 10)
    served: list[str] = []

    async def turn(session: str, tool_loop: bool) -> None:
        decision = await admission.admit(route, everyone, session, tool_loop)
        served.append(session)
        await asyncio.sleep(0)
        admission.release(decision.worker_id)

    tasks = [asyncio.create_task(turn(s, t)) for s, t in (("long", False), ("short", False), ("tool", True))]
    await asyncio.sleep(0.01)
    assert admission.queued == 3
    with pytest.raises(QueueFull):
        await admission.admit(route, everyone, "late", False)
    admission.release("w1")
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert served == ["tool", "short", "long"]
    assert admission.inflight("w1") == 0 and admission.queued == 0


async def test_saturated_worker_is_excluded_and_missing_workers_refused() -> None:
    admission = Admission()
    admission.set_limit("w1", 1)
    admission.set_limit("w2", 1)
    route = first_free(["w1", "w2"])
    both = frozenset({"w1", "w2"})
    assert (await admission.admit(route, both, "a", False)).worker_id == "w1"
    assert (await admission.admit(route, both, "b", False)).worker_id == "w2"
    with pytest.raises(NoWorker):
        await admission.admit(route, frozenset({"w3"}), "c", False)


async def test_a_waiter_that_times_out_leaves_no_slot_taken() -> None:
    admission = Admission(queue_timeout_s=0.05)
    admission.set_limit("w1", 1)
    route = first_free(["w1"])
    await admission.admit(route, frozenset({"w1"}), "a", False)
    with pytest.raises(TimeoutError):
        await admission.admit(route, frozenset({"w1"}), "b", False)
    assert admission.queued == 0
    admission.release("w1")
    assert admission.inflight("w1") == 0


async def test_waiters_fail_fast_when_their_workers_leave() -> None:
    admission = Admission(queue_timeout_s=5)
    admission.set_limit("w1", 1)
    route = first_free(["w1"])
    await admission.admit(route, frozenset({"w1"}), "a", False)
    waiting = asyncio.create_task(admission.admit(route, frozenset({"w1"}), "b", False))
    await asyncio.sleep(0.01)
    admission.remove_worker("w1")
    with pytest.raises(NoWorker):
        await asyncio.wait_for(waiting, 1)
