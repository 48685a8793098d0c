"""The Router facade as the gateway and the simulator drive it: streams, dumps, sessions, pins, expiry."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.protocol import (
    MAX_SESSION_ID_CHARS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlock,
    KvEventBatch,
    KvStateDump,
    PinHint,
    WorkerRegistration,
)
from router.request import RouteRequest
from router.router import NoWorkerError, Router

BS = 16


def reg(wid: str, epoch: int = 1, model: str = "m", events: bool = True) -> WorkerRegistration:
    return WorkerRegistration(
        wid, f"http://{wid}", model, BS, 1000, "mock", epoch, 0.0, publishes_events=events
    )


def batch(wid: str, seq: int, *events, epoch: int = 1) -> KvEventBatch:
    return KvEventBatch(wid, epoch, seq, 0.0, list(events))


def req(rid: str, blocks: list[int], session: str | None = None, tool: bool = False) -> RouteRequest:
    return RouteRequest(rid, "m", blocks, len(blocks) * BS, session, tool_call_pending=tool)


@pytest.fixture
def router() -> Router:
    r = Router(config=RouterConfig(pin_min_s=5.0, pin_max_s=120.0, think_default_s=10.0, pin_factor=1.5))
    r.add_worker(reg("a"), 0.0)
    r.add_worker(reg("b"), 0.0)
    return r


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        Router(policy="nope")


def test_sequence_gaps_duplicates_and_restarts(router: Router) -> None:
    idx = router.index
    assert router.apply_kv_batch(batch("a", 0, BlockStored([1, 2, 3])), 0.0)
    assert router.apply_kv_batch(batch("a", 0, BlockRemoved([1])), 0.0)  # duplicate: ignored
    assert idx.overlap([1, 2, 3]) == {"a": 3}
    assert not router.apply_kv_batch(batch("a", 2, BlockStored([4], 3)), 0.0)  # seq 1 lost: ask a dump
    assert idx.overlap([1, 2, 3, 4]) == {"a": 4}  # still applied, best effort
    assert router.apply_kv_batch(batch("a", 3, BlockRemoved([4])), 0.0)
    assert not router.apply_kv_batch(batch("a", 5, BlockStored([7]), epoch=2), 0.0)  # restart, mid-stream
    assert idx.overlap([1, 2, 3]) == {}
    assert router.apply_kv_batch(batch("a", 4, BlockStored([1]), epoch=1), 0.0)  # the old process: ignored
    assert idx.overlap([1]) == {}
    assert router.apply_kv_batch(batch("b", 0, BlockStored([1]), AllBlocksCleared(), BlockStored([9])), 0.0)
    assert idx.overlap([9]) == {"b": 1} and idx.overlap([1]) == {}


def test_a_first_batch_that_is_not_the_start_asks_for_a_dump(router: Router) -> None:
    assert not router.apply_kv_batch(batch("a", 7, BlockStored([1])), 0.0)
    dump = KvStateDump("a", 1, 9, [CachedBlock(1, None), CachedBlock(2, 1), CachedBlock(5, None, "host")])
    router.apply_state_dump(dump, 0.0)
    assert router.index.overlap([1, 2]) == {"a": 2}
    assert router.index.overlap([5], "host") == {"a": 1}
    assert router.apply_kv_batch(batch("a", 9, BlockRemoved([2])), 0.0)  # covered by the dump
    assert router.index.overlap([1, 2]) == {"a": 2}
    assert router.apply_kv_batch(batch("a", 10, BlockRemoved([2])), 0.0)
    assert router.index.overlap([1, 2]) == {"a": 1}


def test_a_dump_older_than_the_batches_applied_meanwhile_does_not_undo_them(router: Router) -> None:
    """The dump answers a gap, but batches after it arrive first: they are re-applied on top of it."""
    assert router.apply_kv_batch(batch("a", 0, BlockStored([1, 2, 3])), 0.0)
    assert not router.apply_kv_batch(batch("a", 2, BlockStored([4], 3)), 0.0)  # seq 1 lost: a dump
    assert router.apply_kv_batch(batch("a", 3, BlockRemoved([3, 4])), 0.0)  # newer than the dump
    assert router.apply_kv_batch(batch("a", 4, BlockStored([8], None)), 0.0)
    dump = KvStateDump(
        "a", 1, 2, [CachedBlock(1, None), CachedBlock(2, 1), CachedBlock(3, 2), CachedBlock(4, 3)]
    )
    assert router.apply_state_dump(dump, 0.0)
    assert router.index.overlap([1, 2, 3, 4]) == {"a": 2}  # seq 3's removal survives the older dump
    assert router.index.overlap([8]) == {"a": 1}
    assert router.apply_kv_batch(batch("a", 4, BlockRemoved([8])), 0.0)  # already applied: ignored
    assert router.index.overlap([8]) == {"a": 1}


def test_a_dump_asked_for_without_a_gap_keeps_the_batches_meanwhile(router: Router) -> None:
    assert router.apply_kv_batch(batch("a", 0, BlockStored([1, 2])), 0.0)
    router.expect_dump("a")  # e.g. after a NATS reconnect
    assert router.apply_kv_batch(batch("a", 1, BlockRemoved([2])), 0.0)
    assert router.apply_state_dump(KvStateDump("a", 1, 0, [CachedBlock(1, None), CachedBlock(2, 1)]), 0.0)
    assert router.index.overlap([1, 2]) == {"a": 1}


def test_removing_a_worker_drops_its_blocks_and_routes_elsewhere(router: Router) -> None:
    router.apply_kv_batch(batch("a", 0, BlockStored([1, 2, 3])), 0.0)
    router.remove_worker("a")
    assert router.workers() == ["b"]
    assert router.index.overlap([1, 2, 3]) == {}
    assert router.pick(req("r1", [1, 2, 3]), 0.0).worker_id == "b"
    router.add_worker(reg("a"), 1.0)
    assert router.index.overlap([1, 2, 3]) == {}


def test_a_reregistration_with_a_new_epoch_forgets_the_old_blocks(router: Router) -> None:
    router.apply_kv_batch(batch("a", 0, BlockStored([1, 2, 3])), 0.0)
    router.add_worker(reg("a"), 1.0)  # heartbeat: same epoch, nothing changes
    assert router.index.overlap([1, 2, 3]) == {"a": 3}
    router.add_worker(reg("a", epoch=2), 2.0)
    assert router.index.overlap([1, 2, 3]) == {}


def test_no_worker_left_raises_a_lookup_error(router: Router) -> None:
    with pytest.raises(NoWorkerError):
        router.pick(req("r1", [1]), 0.0, exclude=frozenset({"a", "b"}))
    assert issubclass(NoWorkerError, LookupError)
    with pytest.raises(NoWorkerError):
        Router().pick(req("r1", [1]), 0.0)


def test_candidates_are_the_workers_of_the_requested_model() -> None:
    router = Router(policy="round_robin")
    router.add_worker(reg("a", model="small"), 0.0)
    router.add_worker(reg("b", model="large"), 0.0)
    assert {router.pick(RouteRequest(f"r{i}", "large", [], 1), 0.0).worker_id for i in range(4)} == {"b"}


def test_sessions_are_explicit_or_inferred_from_the_chain_they_extend(router: Router) -> None:
    assert router.resolve_session("abc", [1, 2]) == "abc"
    long_id = "x" * 10_000
    assert router.resolve_session(long_id, []) == router.resolve_session(long_id, [5])
    assert len(router.resolve_session(long_id, [])) < 100
    first = router.resolve_session(None, [10, 11, 12])
    router.pick(req("r1", [10, 11, 12], first), 0.0)
    assert router.resolve_session(None, [10, 11, 12, 13, 14]) == first  # the next turn
    assert router.resolve_session(None, [10, 99]) != first
    assert router.resolve_session(None, []) != router.resolve_session(None, [])  # nothing to go by


def test_decodes_go_apart_only_on_workers_that_schedule_by_priority() -> None:
    """session_kv sends a turn's decode apart, at a priority every prompt outranks by more than the
    worker's threshold, where the worker's registration says its engine schedules by priority and it
    returns token ids; not elsewhere, not when `yield_decodes` is off, not for a caller that sends a
    turn as one request, and never for a baseline."""

    def ranked(wid: str, threshold: int, ids: bool = True) -> WorkerRegistration:
        url = f"http://{wid}"
        return WorkerRegistration(
            wid, url, "m", BS, 1000, "mock", 1, 0.0, priority_threshold=threshold, returns_token_ids=ids
        )

    r = Router(splits_turns=True)
    r.add_worker(reg("a"), 0.0)
    r.add_worker(ranked("b", 10), 0.0)
    r.add_worker(ranked("d", 10, ids=False), 0.0)  # no token ids: the two answers cannot be joined
    assert r.decode_priority("a") is None and r.decode_priority("b") == -11
    assert r.decode_priority("d") is None
    r.add_worker(reg("b"), 1.0)  # a heartbeat from the same epoch: the engine no longer does
    assert r.decode_priority("b") is None
    r.add_worker(ranked("b", 0), 2.0)
    assert r.decode_priority("b") == -1
    r.remove_worker("b")
    assert r.decode_priority("b") is None
    for router in (
        Router(config=RouterConfig(yield_decodes=False), splits_turns=True),
        Router(policy="cache_aware", splits_turns=True),
        Router(),
    ):
        router.add_worker(ranked("c", 10), 0.0)
        assert router.decode_priority("c") is None


def test_with_split_fcfs_decodes_go_apart_on_first_come_first_served_workers_with_a_host_tier() -> None:
    """With `split_fcfs` session_kv also sends a turn's decode apart, at the default priority (0), to a
    first-come-first-served worker that returns token ids and has a host tier (where the decode part
    finds the blocks its prompt let others evict); not to one without a tier or token ids; a worker
    that schedules by priority keeps its own rule."""

    def worker(wid: str, host: int, ids: bool = True, threshold: int = -1) -> WorkerRegistration:
        return WorkerRegistration(
            wid, f"http://{wid}", "m", BS, 1000, "mock", 1, 0.0, priority_threshold=threshold,
            returns_token_ids=ids, host_blocks=host,
        )  # fmt: skip

    r = Router(config=RouterConfig(split_fcfs=True), splits_turns=True)
    pool = (worker("t", 4000), worker("n", 0), worker("x", 4000, ids=False), worker("p", 0, True, 10))
    for registration in pool:
        r.add_worker(registration, 0.0)
    assert [r.decode_priority(w) for w in "tnxp"] == [0, None, None, -11]
    r.add_worker(worker("t", 0), 1.0)  # a heartbeat without the tier
    assert r.decode_priority("t") is None
    for router in (
        Router(config=RouterConfig(split_fcfs=False), splits_turns=True),
        Router(config=RouterConfig(split_fcfs=True), policy="cache_aware", splits_turns=True),
        Router(config=RouterConfig(split_fcfs=True)),
    ):
        router.add_worker(worker("t", 4000), 0.0)
        assert router.decode_priority("t") is None


def test_decode_slices_go_to_first_come_first_served_workers_that_get_turns_split() -> None:
    """`decode_slice_tokens` slices the decode on a first-come-first-served worker that gets turns split
    (`split_fcfs`); a worker that schedules by priority preempts decodes for prompts itself and gets
    the decode in one part, as does one whose turns go whole."""

    def worker(wid: str, host: int, threshold: int = -1) -> WorkerRegistration:
        return WorkerRegistration(
            wid, f"http://{wid}", "m", BS, 1000, "mock", 1, 0.0, priority_threshold=threshold,
            returns_token_ids=True, host_blocks=host,
        )  # fmt: skip

    r = Router(config=RouterConfig(decode_slice_tokens=256), splits_turns=True)
    for registration in (worker("t", 4000), worker("n", 0), worker("p", 4000, 10)):
        r.add_worker(registration, 0.0)
    assert [r.decode_slice_tokens(w) for w in "tnpz"] == [256, 0, 0, 0]
    for router in (
        Router(config=RouterConfig(decode_slice_tokens=0), splits_turns=True),
        Router(config=RouterConfig(decode_slice_tokens=256, split_fcfs=False), splits_turns=True),
        Router(config=RouterConfig(decode_slice_tokens=256)),
    ):
        router.add_worker(worker("t", 4000), 0.0)
        assert router.decode_slice_tokens("t") == 0


def test_a_tool_call_turn_returns_a_pin_for_its_expected_tool_time(router: Router) -> None:
    chain = list(range(100, 140))
    d = router.pick(req("r1", chain, "s"), 0.0)
    hint = router.on_complete("r1", 1.0, "tool_calls", 20)
    # default think time 10 s x 1.5; kept on a host tier 4x as long, brought back 1 s before 10 s
    assert hint == (d.worker_id, PinHint("s", chain, 15.0, 60.0, 9.0))
    router.pick(req("r2", [*chain, 1, 2], "s"), 41.0)  # the tool took 40 s
    _, pin = router.on_complete("r2", 42.0, "tool_calls", 20)
    assert pin.ttl_s == pytest.approx(1.5 * 40)  # the first gap seen replaces the default
    router.pick(req("r3", [*chain, 1, 2, 3], "s"), 52.0)  # 10 s this time: EWMA
    assert router.on_complete("r3", 53.0, "tool_calls", 5)[1].ttl_s == pytest.approx(
        1.5 * (0.3 * 10 + 0.7 * 40)
    )
    router.pick(req("r3", [*chain, 1, 2, 3], "s"), 4000.0)  # a long gap: bounded
    assert router.on_complete("r3", 4001.0, "tool_calls", 5)[1].ttl_s == 120.0
    router.pick(req("r4", [*chain, 1, 2, 3, 4], "s"), 4002.0)
    assert router.on_complete("r4", 4003.0, "stop", 5) is None  # ended normally: no pin
    session = router.sessions.get("s")
    assert session.turns == 5 and session.last_finish_reason == "stop"
    assert session.attained_tokens > 0


def test_pins_when_the_request_said_a_tool_call_is_pending_but_not_on_failure(router: Router) -> None:
    router.pick(req("r1", [1, 2, 3], "s", tool=True), 0.0)
    assert router.on_complete("r1", 1.0, "stop", 5) is not None
    router.pick(req("r2", [1, 2, 3, 4], "s"), 2.0)
    assert router.on_complete("r2", 3.0, "tool_calls", 5, ok=False) is None
    assert router.on_complete("r2", 3.0, "tool_calls", 5) is None  # already completed
    assert router.on_complete("never-picked", 3.0, "tool_calls", 5) is None


def test_approximate_mode_counts_routed_blocks_until_their_ttl() -> None:
    router = Router(policy="kv_overlap", config=RouterConfig(approx_ttl_s=60.0))
    router.add_worker(reg("a", events=False), 0.0)
    router.add_worker(reg("b", events=False), 0.0)
    chain = list(range(1, 51))
    first = router.pick(req("r1", chain), 0.0)
    router.on_complete("r1", 1.0, "stop", 1)
    again = router.pick(req("r2", chain), 10.0)
    assert again.worker_id == first.worker_id and again.overlap_blocks == 50
    router.on_complete("r2", 11.0, "stop", 1)
    router.expire(100.0)
    assert router.pick(req("r3", chain), 100.0).overlap_blocks == 0
    assert router.apply_kv_batch(batch("a", 0, BlockStored([1])), 100.0)  # silent worker: ignored


def test_expire_drops_lost_requests_and_idle_sessions() -> None:
    router = Router(config=RouterConfig(inflight_ttl_s=100.0, prefill_ttl_s=10.0, session_ttl_s=50.0))
    router.add_worker(reg("a"), 0.0)
    router.pick(req("r1", [1, 2], "s"), 0.0)
    assert router.load.requests("a") == 1
    router.expire(60.0)
    assert router.sessions.get("s") is None
    assert router.load.queued_prefill("a", 60.0) == 0 and router.load.requests("a") == 1
    router.expire(101.0)
    assert router.load.requests("a") == 0
    assert router.on_complete("r1", 102.0, "tool_calls", 1) is None


def test_a_worker_claiming_huge_capacity_gets_a_bounded_index() -> None:
    # the claim is the worker's word: the index holds at most index_blocks_per_worker_max of its blocks
    config = RouterConfig(index_blocks_per_worker_min=4, index_blocks_per_worker_max=8)
    router = Router(config=config)
    huge = WorkerRegistration("a", "http://a", "m", BS, 1 << 40, "mock", 1, 0.0, publishes_events=True)
    router.add_worker(huge, 0.0)
    assert router.apply_kv_batch(batch("a", 0, BlockStored(list(range(1, 9)))), 0.0)
    assert router.index.overlap(list(range(1, 9))) == {"a": 8}
    assert not router.apply_kv_batch(batch("a", 1, BlockStored([9], 8)), 0.0)  # over: dropped, dump
    assert router.index.overlap(list(range(1, 10))) == {}


@pytest.mark.parametrize(
    "bad",
    [
        {"max_sessions": 0},
        {"pin_min_s": 10.0, "pin_max_s": 5.0},
        {"default_prefill_tok_s": 0.0},
        {"index_blocks_per_worker_min": 8, "index_blocks_per_worker_max": 4},
        {"max_session_id_len": MAX_SESSION_ID_CHARS + 1},  # pin hints carry the ids: workers refuse longer
    ],
)
def test_nonsense_config_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        RouterConfig(**bad)


def test_pins_on_a_pending_tool_call_can_be_limited_to_tool_call_finishes() -> None:
    router = Router(config=RouterConfig(pin_on_tool_result=False))
    router.add_worker(reg("a"), 0.0)
    router.pick(req("r1", [1, 2, 3], "s", tool=True), 0.0)
    assert router.on_complete("r1", 1.0, "stop", 5) is None
    router.pick(req("r2", [1, 2, 3, 4], "s", tool=True), 2.0)
    assert router.on_complete("r2", 3.0, "tool_calls", 5) is not None


def test_with_host_prefetch_a_pin_says_when_to_bring_the_blocks_back() -> None:
    r = Router(config=RouterConfig(think_default_s=10.0, pin_factor=1.5, host_prefetch=True))
    r.add_worker(reg("a"), 0.0)
    chain = list(range(100, 140))
    r.pick(req("r1", chain, "s"), 0.0)
    _, pin = r.on_complete("r1", 1.0, "tool_calls", 20)
    assert pin.prefetch_after_s == pytest.approx(9.0)  # the expected 10 s tool time, less the 1 s lead


def test_a_session_keeps_its_matches_as_probes_for_its_next_turn(router: Router) -> None:
    chain = list(range(1, 41))
    assert router.apply_kv_batch(batch("a", 0, BlockStored(chain[:30])), 0.0)
    assert router.apply_kv_batch(batch("b", 0, BlockStored(chain[:10])), 0.0)
    router.pick(req("r1", chain, "s"), 0.0)  # a new session: nothing to probe yet
    router.pick(req("r2", [*chain, 41], "s"), 1.0)
    session = router.sessions.get("s")
    assert session is not None and session.match_lengths == (10, 30)
    assert router.apply_kv_batch(batch("b", 1, BlockStored(chain[10:35], chain[9])), 1.0)
    router.pick(req("r3", [*chain, 41, 42], "s"), 2.0)  # a probe misses b's moved boundary: bisected
    assert router.index.overlap([*chain, 41, 42]) == {"a": 30, "b": 35}
    assert session.match_lengths == (30, 35)
