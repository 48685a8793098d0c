"""`kv_overlap` with Dynamo 1.6.1's router queue (`kv_queue_threshold`, `kv_queue_policy`: Dynamo's
`--router-queue-threshold`, `--router-queue-policy`; router/dynamo_queue.py), driven through the real
Router: each rule as Dynamo's `SchedulerQueue` (lib/kv-router/src/scheduling/queue.rs, policy_queue.rs,
policy_config.rs) has it."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.protocol import BlockStored, KvEventBatch, WorkerRegistration
from router.request import RouteRequest
from router.router import Router

BS = 16
PREFIX = list(range(200))


def make(
    workers: int = 2, threshold: float = 0.0, policy: str = "wspt", batched: int = 0, **config: object
) -> Router:
    wspt = policy == "wspt"
    settings = RouterConfig(kv_queue=True, kv_queue_threshold=threshold, kv_queue_wspt=wspt, **config)  # type: ignore[arg-type]
    router = Router(policy="kv_overlap", config=settings, seed=1)
    for i in range(workers):
        reg = WorkerRegistration(
            f"w{i}", f"http://w{i}", "m", BS, 1000, "mock", 1, 0.0, max_num_batched_tokens=batched
        )
        router.add_worker(reg, 0.0)
    return router


def turn(rid: str, blocks: list[int], session: str | None = None) -> RouteRequest:
    return RouteRequest(rid, "m", blocks, len(blocks) * BS, session, expected_output_tokens=10)


def fresh(rid: str, n: int, base: int) -> RouteRequest:
    return turn(rid, list(range(base, base + n)))


def send(router: Router, request: RouteRequest, now: float) -> str:
    """Admit and pick the request (it must not wait): its worker."""
    assert router.admit(request, now)
    return router.pick(request, now).worker_id


def test_off_by_default_and_only_in_front_of_kv_overlap() -> None:
    assert not RouterConfig().kv_queue and not RouterConfig().kv_queue_wspt  # Dynamo's: off, fcfs
    assert Router(policy="kv_overlap").kv_queue is None
    assert Router(policy="session_kv", config=RouterConfig(kv_queue=True)).kv_queue is None
    for bad in ({"kv_queue_threshold": -0.1}, {"kv_queue_threshold": float("inf")}):
        with pytest.raises(ValueError, match="kv_queue_threshold"):
            RouterConfig(**bad)  # type: ignore[arg-type]


def test_at_threshold_zero_a_worker_is_busy_until_its_prefills_have_a_first_token() -> None:
    router = make()
    assert {send(router, fresh("a", 10, 0), 0.0), send(router, fresh("b", 10, 100), 0.0)} == {"w0", "w1"}
    assert not router.admit(fresh("c", 10, 200), 0.1)  # every worker has prefill in flight
    assert router.release_held(0.2) == []
    router.on_first_token("a", 0.5)  # a's prefill done; its decode does not make the worker busy
    assert router.release_held(0.5) == ["c"]
    assert router.pick(fresh("c", 10, 200), 0.5).worker_id == router.load.get("a").worker_id  # type: ignore[union-attr]


def test_busy_is_strictly_above_the_fraction_of_max_num_batched_tokens() -> None:
    # 0.5 x 320 = 160 tokens: a worker with exactly 160 in flight is not busy, 161 is
    router = make(workers=1, threshold=0.5, batched=320)
    send(router, fresh("a", 10, 0), 0.0)  # 160 tokens
    assert router.admit(fresh("b", 1, 100), 0.1)  # 160 is not above 160
    router.pick(fresh("b", 1, 100), 0.1)  # 176 now
    assert not router.admit(fresh("c", 1, 200), 0.2)
    # a worker that announces no max_num_batched_tokens: Dynamo's 10,000,000, so never busy here
    lax = make(workers=1, threshold=0.5)
    send(lax, fresh("a", 500, 0), 0.0)
    assert lax.admit(fresh("b", 500, 1_000), 0.1)


def test_nothing_overtakes_a_waiting_request_until_the_next_release() -> None:
    router = make()
    send(router, fresh("a", 10, 0), 0.0)
    send(router, fresh("b", 10, 100), 0.0)
    assert not router.admit(fresh("c", 10, 200), 0.1)
    router.on_first_token("a", 0.2)
    router.on_first_token("b", 0.2)
    # both workers are free now, but c still waits (no release yet): d queues behind it, as in Dynamo
    assert not router.admit(fresh("d", 10, 300), 0.3)
    assert router.release_held(0.4) == ["c", "d"]


def test_wspt_releases_the_shortest_uncached_prefill_first_and_fcfs_the_oldest() -> None:
    # prefill to do: long 80 blocks, cached 30 (200 of its 230 cached on w0), short 20
    for policy, expected in (("wspt", ["short", "cached", "long"]), ("fcfs", ["long", "cached", "short"])):
        router = make(workers=1, policy=policy)
        assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(PREFIX)]), 0.0)
        send(router, fresh("a", 10, 5_000), 0.0)
        waiting = {
            "long": fresh("long", 80, 1_000),
            "cached": turn("cached", [*PREFIX, *range(7_000, 7_030)]),
            "short": fresh("short", 20, 2_000),
        }
        for i, request in enumerate(waiting.values()):
            assert not router.admit(request, 0.1 * (i + 1))
        done = "a"
        for i, rid in enumerate(expected):  # one at a time: each one's prefill makes w0 busy again
            router.on_first_token(done, 1.0 + i)
            assert router.release_held(1.0 + i) == [rid], policy
            router.pick(waiting[rid], 1.0 + i)
            done = rid


def test_a_pinned_request_waits_in_its_workers_lane_without_blocking_the_others() -> None:
    router = make(kv_affinity_ttl_s=60.0)
    s_worker = send(router, turn("s1", list(range(9_000, 9_010)), "s"), 0.0)
    other = send(router, fresh("x", 10, 100), 0.0)
    assert s_worker != other
    router.on_first_token("s1", 0.1)
    router.on_complete("s1", 0.2, "stop", 10)
    send(router, fresh("y", 10, 200), 0.3)  # goes to s's worker (the other is busy with x): busy both
    assert not router.admit(turn("s2", list(range(9_000, 9_012)), "s"), 0.4)  # pinned to s_worker
    assert not router.admit(fresh("z", 50, 300), 0.5)  # unpinned, behind it
    router.on_first_token("x", 0.6)  # `other` frees up; s's worker is still busy with y
    assert router.release_held(0.6) == ["z"]  # s2's lane is blocked, z is not held behind it
    assert router.pick(fresh("z", 50, 300), 0.6).worker_id == other
    router.on_first_token("y", 0.7)
    assert router.release_held(0.7) == ["s2"]
    assert router.pick(turn("s2", list(range(9_000, 9_012)), "s"), 0.7).worker_id == s_worker


def test_a_free_worker_opens_the_gate_but_the_kv_cost_over_all_workers_picks() -> None:
    router = make()
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(PREFIX)]), 0.0)
    assert send(router, turn("a", [*PREFIX[:50], *range(5_000, 5_010)]), 0.0) == "w0"
    assert send(router, fresh("b", 10, 6_000), 0.0) == "w1"
    assert not router.admit(turn("c", [*PREFIX, *range(7_000, 7_005)]), 0.1)
    router.on_first_token("b", 0.2)  # w1 frees up
    assert router.release_held(0.2) == ["c"]
    # released because w1 was free, yet placed on the busy w0 that holds its 200-block prefix
    assert router.pick(turn("c", [*PREFIX, *range(7_000, 7_005)]), 0.2).worker_id == "w0"


def test_no_time_bound_but_a_periodic_recheck_and_a_stale_overlap_refreshed_after_10_s() -> None:
    router = make(workers=1)
    send(router, fresh("a", 10, 0), 0.0)
    assert not router.admit(turn("b", [*PREFIX, 1_000]), 0.5)
    assert router.held_deadline() == pytest.approx(60.0)  # Dynamo's 60 s tick, not a bound
    assert router.release_held(60.0) == [] and router.held_deadline() == pytest.approx(120.0)
    # b's prefix was cached nowhere at its enqueue; w0 holds it now. Released 10 s+ after: read again
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 61.0, [BlockStored(PREFIX)]), 61.0)
    router.on_first_token("a", 61.0)
    assert router.release_held(61.0) == ["b"]
    assert router.pick(turn("b", [*PREFIX, 1_000]), 61.0).overlap_blocks == 200


def test_a_request_released_within_10_s_is_scored_with_its_enqueue_overlap() -> None:
    router = make(workers=1)
    send(router, fresh("a", 10, 0), 0.0)
    assert not router.admit(turn("b", [*PREFIX, 1_000]), 0.5)
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 1.0, [BlockStored(PREFIX)]), 1.0)
    router.on_first_token("a", 2.0)
    assert router.release_held(2.0) == ["b"]
    assert router.pick(turn("b", [*PREFIX, 1_000]), 2.0).overlap_blocks == 0


def test_a_cancelled_request_is_forgotten_and_a_release_not_taken_is_undone() -> None:
    router = make(workers=1)
    send(router, fresh("a", 10, 0), 0.0)
    assert not router.admit(fresh("b", 10, 100), 0.1)
    assert not router.admit(fresh("c", 10, 200), 0.2)
    router.cancel_held("b", None, 0.3)
    router.on_first_token("a", 0.4)
    assert router.release_held(0.4) == ["c"]
    assert router.load.get("c") is not None  # booked at its release
    router.cancel_held("c", None, 0.5)  # its client went away before taking it
    assert router.load.get("c") is None and router.kv_queue is not None and router.kv_queue.held == 0
