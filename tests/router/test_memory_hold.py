"""The router-side hold for a pick that would block its worker's queue (router/memory_hold.py), driven
through the real Router: held while its predicted wait for device memory (memory_wait.py) lasts."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.memory_hold import MemoryHold
from router.protocol import LoadReport, WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router

BS = 16


def make(split: bool = False, **config: object) -> Router:
    """One worker of 1,000 blocks running two decodes of 400 prompt blocks, 100 and 300 tokens to go
    at a token every 0.1 s, 820 blocks in use 1 s in (tests/router/test_memory_wait.py's case: a
    300-block prompt waits 9 s there for the first decode to end). `split`: the worker returns token
    ids and has a host tier, so the router splits its turns (`split_fcfs`)."""
    settings = RouterConfig(memory_hold=True, **config)
    router = Router(policy="session_kv", config=settings, seed=1, splits_turns=split)
    router.add_worker(
        WorkerRegistration(
            "w0", "http://w0", "m", BS, 1000, "mock", 1, 0.0,
            returns_token_ids=split, host_blocks=4000 if split else 0,
        ),
        0.0,
    )  # fmt: skip
    for rid, output, base in (("a", 100, 10_000), ("b", 300, 20_000)):
        request = RouteRequest(rid, "m", chain(400, base), 400 * BS, rid, expected_output_tokens=output)
        assert router.record(request, Decision("w0", 0, 0.0, "load"), 0.0)
        router.on_first_token(rid, 0.0)
    report(router, 2, 820, 1.0)
    return router


def chain(n: int, base: int) -> list[int]:
    return list(range(base, base + n))


def report(router: Router, running: int, used: int, now: float, active_prefill: int = 0) -> None:
    router.apply_load(
        LoadReport("w0", now, running, 0, active_prefill, used, 1000, 10_000.0, 10.0 * running), now
    )


def offer(router: Router, rid: str, blocks: int, base: int, now: float) -> bool:
    request = RouteRequest(rid, "m", chain(blocks, base), blocks * BS, rid, expected_output_tokens=10)
    return router.room_offer(request, router.pick(request, now), now)


def test_a_pick_that_would_wait_for_memory_is_held_and_one_that_fits_passes_it() -> None:
    router = make()
    hold = router.memory_hold
    assert hold is not None
    assert not offer(router, "big", 300, 30_000, 1.0)  # 9 s predicted: it would head the engine's queue
    assert hold.held == 1 and router.rooms_deadline() == pytest.approx(1.1)  # re-checked every 0.1 s
    # a 150-block pick fits beside the running decodes: the held one is not at the worker, so it passes
    assert offer(router, "small", 150, 40_000, 1.05)
    # the held pick's prefill stays queued on the worker through the worker's reports, which do not
    # count it (the small one's is in the report's from now on)
    report(router, 2, 820, 1.1)
    assert router.load.workers["w0"].prefill_since_report == 300 * BS
    assert router.release_rooms(1.1) == []
    # decode a ends and frees its 400 blocks: the held pick fits now and goes
    router.on_complete("a", 10.0, "stop", 100)
    report(router, 2, 600, 10.0)
    assert router.release_rooms(10.0) == ["big"]
    assert hold.held == 0 and hold.stats.held_total == 1 and hold.stats.overdue_total == 0
    assert hold.stats.hold_s == pytest.approx(9.0) and router.rooms_deadline() is None
    # sent, it counts as picked after the last report: ahead of the next pick, which now waits
    assert not offer(router, "next", 300, 50_000, 10.05)


def test_a_held_pick_goes_at_the_bound_and_a_cancelled_one_is_forgotten() -> None:
    router = make(memory_hold_max_s=5.0, memory_hold_crowded_max_s=5.0)
    assert not offer(router, "big", 300, 30_000, 1.0)
    assert not offer(router, "other", 300, 40_000, 1.5)
    report(router, 2, 870, 5.9)
    assert router.release_rooms(5.9) == []
    assert router.release_rooms(6.0) == ["big"]
    assert router.memory_hold is not None and router.memory_hold.stats.overdue_total == 1
    router.cancel_room("other")
    assert router.memory_hold.held == 0 and router.rooms_deadline() is None


def test_a_pick_held_beside_others_for_its_worker_waits_the_longer_bound() -> None:
    # sent at its bound, a pick heads its worker's queue: with others held for that worker it would
    # block them all, so it waits the crowded bound; once it is held alone, the plain one applies
    router = make(
        report_stale_s=60.0, memory_hold_recheck_s=0.0, memory_hold_max_s=5.0, memory_hold_crowded_max_s=20.0
    )
    hold = router.memory_hold
    assert hold is not None
    assert not offer(router, "big", 300, 30_000, 1.0)
    assert router.rooms_deadline() == pytest.approx(6.0)  # alone: the plain bound
    assert not offer(router, "other", 300, 40_000, 1.5)
    assert router.rooms_deadline() == pytest.approx(21.0)  # crowded: the oldest pick's longer bound
    report(router, 2, 870, 6.0)
    assert router.release_rooms(6.0) == [] and hold.held == 2
    router.cancel_room("other")  # its client went away: big is alone again, long past 5 s
    assert router.rooms_deadline() == pytest.approx(6.0)
    assert router.release_rooms(6.1) == ["big"] and hold.stats.overdue_total == 1
    with pytest.raises(ValueError):
        MemoryHold(max_hold_s=1.0, max_held=1, recheck_s=0.1, min_wait_ms=0.0, crowded_max_hold_s=-1.0)


def test_a_short_predicted_wait_is_not_held() -> None:
    assert offer(make(memory_hold_min_wait_ms=10_000.0), "big", 300, 30_000, 1.0)  # 9 s is short enough


def test_a_worker_whose_turns_the_router_splits_is_never_held() -> None:
    # there the decode parts queue behind the prompts, which get memory first: nothing to skip
    router = make(split=True)
    assert router.decode_priority("w0") == 0
    assert offer(router, "big", 300, 30_000, 1.0)
    assert router.memory_hold is not None and router.memory_hold.held == 0


def test_a_prefill_in_progress_counts_the_blocks_it_is_still_to_take() -> None:
    # a prompt admitted on w0 has computed part of its 3,200 tokens: the report counts the blocks taken
    # so far (820) and 3,200 tokens still to prefill. A 150-block pick fits the blocks free now, but the
    # prefill's next chunks take 200 of them: counted (count_prefill_in_progress, on), it is held
    for counts, sent in ((False, True), (True, False)):
        router = make(count_prefill_in_progress=counts)
        report(router, 3, 820, 1.0, active_prefill=200 * BS)
        assert offer(router, "small", 150, 40_000, 1.0) is sent


def test_on_by_default_for_session_kv_and_the_baselines_never_hold() -> None:
    assert Router(policy="session_kv", config=RouterConfig()).memory_hold is not None
    off = RouterConfig(memory_hold=False)
    assert Router(policy="session_kv", config=off).memory_hold is None
    assert Router(policy="kv_overlap", config=RouterConfig(memory_hold=True)).memory_hold is None


def test_the_hold_checks_its_settings() -> None:
    with pytest.raises(ValueError):
        MemoryHold(max_hold_s=-1.0, max_held=1, recheck_s=0.1, min_wait_ms=0.0)
    with pytest.raises(ValueError):
        MemoryHold(max_hold_s=1.0, max_held=1, recheck_s=-0.1, min_wait_ms=0.0)


def test_a_held_pick_is_released_by_its_workers_load_report_not_by_polling() -> None:
    # big waits for decode a, which ends at 10 s: from 8 s its predicted wait is at most the 2 s
    # threshold. Nothing changed on w0 since the check at 1 s, so a pass at 8.5 s re-checks nothing
    # (the first version re-checked it every 0.1 s); w0's next report does.
    router = make(report_stale_s=60.0, memory_hold_recheck_s=0.0)
    hold = router.memory_hold
    assert hold is not None and router.rechecks_rooms_on_change
    assert not offer(router, "big", 300, 30_000, 1.0)
    assert router.release_rooms(1.0) == [] and not router.rooms_pending()
    assert router.rooms_deadline() == pytest.approx(21.0)  # the bound: the report stays fresh past it
    assert router.release_rooms(8.5) == [] and hold.held == 1
    report(router, 2, 820, 8.5)
    assert router.rooms_pending()
    assert router.release_rooms(8.5) == ["big"] and hold.held == 0
    # with a period (the first version), the same pass releases it without the report
    polled = make(report_stale_s=60.0, memory_hold_recheck_s=0.1)
    assert not polled.rechecks_rooms_on_change
    assert not offer(polled, "big", 300, 30_000, 1.0)
    assert polled.rooms_deadline() == pytest.approx(1.1)
    assert polled.release_rooms(8.5) == ["big"]


def two_workers() -> Router:
    """`make`'s w0 with 600 of its blocks in use and a 300-block prompt "c" sent there after that
    report, still prefilling; an idle w1 beside it."""
    router = make(report_stale_s=60.0, memory_hold_recheck_s=0.0)
    router.add_worker(WorkerRegistration("w1", "http://w1", "m", BS, 1000, "mock", 1, 0.0), 1.0)
    report(router, 2, 600, 1.0)
    c = RouteRequest("c", "m", chain(300, 60_000), 300 * BS, "c", expected_output_tokens=10)
    assert router.record(c, Decision("w0", 0, 0.0, "load"), 1.0)
    return router


def test_a_held_pick_is_released_by_a_first_token_or_a_completion_on_its_worker() -> None:
    # big does not fit behind c (600 + 300 + 300 blocks of 1,000): it waits for decode a
    for end in ("first token", "completion"):
        router = two_workers()
        request = RouteRequest("big", "m", chain(300, 30_000), 300 * BS, "big", expected_output_tokens=10)
        assert not router.room_offer(request, Decision("w0", 0, 0.0, "load"), 1.0)
        assert router.release_rooms(1.0) == []
        # another worker's report changes nothing big's wait reads: no re-check
        router.apply_load(LoadReport("w1", 1.5, 0, 0, 0, 0, 1000, 10_000.0, 0.0), 1.5)
        assert not router.rooms_pending()
        # c's prefill ends (its blocks were taken, the report will count them), or c goes away
        if end == "first token":
            router.on_first_token("c", 2.0)
        else:
            router.on_complete("c", 2.0, None, 0, ok=False)
        assert router.rooms_pending(), end
        assert router.release_rooms(2.0) == ["big"], end


def test_a_held_picks_worker_whose_report_goes_stale_releases_it() -> None:
    router = make(memory_hold_recheck_s=0.0)  # reports stale after 2 s
    assert not offer(router, "big", 300, 30_000, 1.0)
    deadline = router.rooms_deadline()
    assert deadline is not None and deadline > 3.0 and deadline == pytest.approx(3.0)
    assert router.release_rooms(3.0) == []  # still fresh at 3.0 itself
    assert router.release_rooms(deadline) == ["big"]


def test_a_worker_without_a_measured_decode_pace_predicts_with_the_default_step() -> None:
    # a fresh worker's first prompt: its report shows it running, 330 of 1,000 blocks in use, no decode
    # step measured yet (nor anywhere in the pool). A 700-block prompt waits for its 1,200-token answer:
    # held at the default 20 ms a step (24 s); a step of 0 (the old reading) predicted no wait at all
    for step_ms, sent in ((20.0, False), (0.0, True)):
        router = Router("session_kv", RouterConfig(default_decode_step_ms=step_ms), seed=1)
        router.add_worker(WorkerRegistration("w0", "http://w0", "m", BS, 1000, "mock", 1, 0.0), 0.0)
        long = RouteRequest("long", "m", chain(32, 1_000), 32 * BS, "long", expected_output_tokens=1200)
        assert router.record(long, Decision("w0", 0, 0.0, "load"), 0.0)
        router.on_first_token("long", 0.05)
        router.apply_load(LoadReport("w0", 0.05, 1, 0, 0, 330, 1000, 10_000.0, 0.0), 0.05)
        assert offer(router, "big", 700, 30_000, 0.06) is sent, step_ms


def test_a_held_pick_goes_at_its_bound_when_nothing_changed() -> None:
    # the pass the deadline calls lets it go: its bound is compared as the deadline adds it (1.1 + 5.0
    # is 6.1, while 6.1 - 5.0 < 1.1: compared so, the pass let nothing go and was called again at once)
    router = make(report_stale_s=60.0, memory_hold_recheck_s=0.0, memory_hold_max_s=5.0)
    assert not offer(router, "big", 300, 30_000, 1.1)
    assert router.release_rooms(1.1) == []
    deadline = router.rooms_deadline()
    assert deadline == 1.1 + 5.0
    assert router.release_rooms(deadline) == ["big"]
    assert router.memory_hold is not None and router.memory_hold.stats.overdue_total == 1


def test_a_pick_sent_by_its_bound_takes_the_shorter_ones_held_for_its_worker_ahead_of_it() -> None:
    # the engine serves its queue in arrival order: sent shortest first, the shorter prompts are
    # through before the long one that heads it (Dynamo's `wspt` order for the worker's backlog)
    router = make(report_stale_s=60.0, memory_hold_recheck_s=0.0, memory_hold_crowded_max_s=5.0)
    hold = router.memory_hold
    assert hold is not None and hold.shortest_first  # on by default
    assert not offer(router, "long", 300, 30_000, 1.0)
    assert not offer(router, "longer", 320, 40_000, 1.2)
    assert not offer(router, "short", 250, 50_000, 1.4)
    assert not offer(router, "shorter", 200, 60_000, 1.6)
    assert router.rooms_deadline() == pytest.approx(6.0)
    assert router.release_rooms(6.0) == ["shorter", "short", "long"]
    assert hold.held == 1 and hold.stats.overdue_total == 3
    assert router.rooms_deadline() == pytest.approx(1.2 + 20.0)  # alone now: its own, plain bound
    assert router.release_rooms(21.2) == ["longer"]


def test_without_shortest_first_a_pick_sent_by_its_bound_goes_alone() -> None:
    router = make(
        report_stale_s=60.0,
        memory_hold_recheck_s=0.0,
        memory_hold_crowded_max_s=5.0,
        memory_hold_shortest_first=False,
    )
    assert not offer(router, "long", 300, 30_000, 1.0)
    assert not offer(router, "short", 250, 50_000, 1.4)
    assert router.release_rooms(6.0) == ["long"]
    assert router.memory_hold is not None and router.memory_hold.held == 1
