"""Scheduler: token budget, admission order and limits, preemption by recompute, too-long sequences."""

from __future__ import annotations

import pytest

from engines.block_manager import BlockManager
from engines.runner import SamplingParams
from engines.scheduler import Scheduler
from engines.sequence import Sequence, SequenceStatus
from router.hashing import BASE_SEED
from tests.engines.kv_replay import check_invariants

B = 4


def seq(seq_id: str, length: int, first: int = 0) -> Sequence:
    return Sequence(seq_id, [first + i for i in range(length)], SamplingParams(), B, BASE_SEED, [])


def compute(sched: Scheduler, work: list[tuple[Sequence, int]]) -> None:
    """What the engine does after the model ran: advance, cache full blocks, append sampled tokens."""
    for s, n in work:
        s.num_computed_tokens += n
        sched.block_manager.commit(s)
        if s.num_computed_tokens == len(s):
            s.token_ids.append(999)


def make(num_blocks: int = 32, max_num_seqs: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, B, lambda: 0.0), max_num_seqs, budget)


def test_chunked_prefill_then_decode_within_the_budget() -> None:
    sched = make(budget=10)
    a, b = seq("a", 13), seq("b", 3, first=100)
    sched.add(a)
    sched.add(b)
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("a", 10)]  # b waits: no budget left
    compute(sched, work)
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("a", 3), ("b", 3)]
    compute(sched, work)
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("a", 1), ("b", 1)]  # both decode
    check_invariants(sched.block_manager, sched.running)


def test_max_num_seqs_and_free_blocks_gate_admission() -> None:
    sched = make(num_blocks=5, max_num_seqs=2, budget=100)
    for i in range(4):
        sched.add(seq(f"s{i}", 4, first=10 * i))
    work, _ = sched.schedule()
    assert [s.seq_id for s, _ in work] == ["s0", "s1"]
    sched.max_num_seqs = 8
    compute(sched, work)
    work, _ = sched.schedule()
    # s0 and s1 decode into a second block each (4 tokens + 1 sampled): the one block left admits
    # s2 but not s3, so free blocks gate admission as max_num_seqs did
    assert [s.seq_id for s, _ in work] == ["s0", "s1", "s2"]
    assert [s.seq_id for s in sched.waiting] == ["s3"]


def test_a_prompt_is_admitted_whole_but_holds_blocks_chunk_by_chunk() -> None:
    """vLLM's rule (and Dynamo's mocker's): the whole prompt must fit to be admitted, but only the
    step's chunk gets blocks; the rest are taken as later chunks are scheduled."""
    sched = make(num_blocks=8, budget=12)
    a, b = seq("a", 20), seq("b", 16, first=100)
    sched.add(a)
    sched.add(b)
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("a", 12)] and len(a.block_table) == 3
    check_invariants(sched.block_manager, sched.running)
    compute(sched, work)
    work, _ = sched.schedule()
    # a's last chunk takes 2 more blocks; b's first 4 tokens would fit in the 3 blocks left, but its
    # whole prompt (4 blocks) does not: it waits
    assert [(s.seq_id, n) for s, n in work] == [("a", 8)] and len(a.block_table) == 5
    assert list(sched.waiting) == [b] and sched.block_manager.num_used == 5
    compute(sched, work)
    sched.finish(a, "length")
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("b", 12)] and len(b.block_table) == 3
    check_invariants(sched.block_manager, sched.running)


def test_preemption_takes_the_most_recent_and_readmits_it_with_its_cached_prefix() -> None:
    sched = make(num_blocks=4, budget=100)
    a, b = seq("a", 8), seq("b", 8, first=50)
    sched.add(a)
    sched.add(b)
    work, _ = sched.schedule()
    compute(sched, work)  # each holds 2 full blocks and a sampled token: the next decode needs a third
    work, _ = sched.schedule()
    assert [s.seq_id for s, _ in work] == ["a"]
    assert b.status is SequenceStatus.WAITING and sched.num_preemptions == 1 and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    check_invariants(sched.block_manager, sched.running)
    sched.finish(a, "length")
    work, _ = sched.schedule()
    # b's blocks were freed tail first; a's new block evicted the tail, the head stayed cached:
    # recompute starts after it (positions 4..8)
    assert [(s.seq_id, n) for s, n in work] == [("b", 5)] and b.num_computed_tokens == 4
    assert b.num_cached_tokens == 0  # what the client is told is its first admission's hit


def test_a_sequence_that_outgrows_the_cache_finishes_with_length() -> None:
    sched = make(num_blocks=2, budget=100)
    s = seq("a", 7)
    sched.add(s)
    for _ in range(3):
        work, too_long = sched.schedule()
        compute(sched, work)
        if too_long:
            break
    assert too_long == [s] and s.finish_reason == "length" and not sched.has_work()
    assert sched.block_manager.num_used == 0


def test_finish_releases_waiting_and_running() -> None:
    sched = make()
    a, b = seq("a", 5), seq("b", 5, first=9)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_work() and sched.block_manager.num_used == 0
    assert a.finish_reason == b.finish_reason == "abort"


def test_a_prompt_that_does_not_fit_preempts_decodes_newest_first_with_preempt_for_prompts() -> None:
    """Known by construction: 8 blocks; a (2 blocks) and b (2 blocks) decode, c waits for a third
    block's prefill; d needs 5 blocks: preempting b alone frees enough (4 free + 2), so only b goes,
    behind every prompt not started (c, then e, which arrives later)."""
    sched = Scheduler(BlockManager(8, B, lambda: 0.0), 8, 100, preempt_for_prompts=True)
    a, b = seq("a", 7), seq("b", 7, first=50)
    for s in (a, b):
        sched.add(s)
    compute(sched, sched.schedule()[0])  # both prefilled, first token out: 2 blocks each
    assert a.num_output_tokens == 1 and sched.block_manager.num_free == 4
    d, c = seq("d", 20, first=100), seq("c", 24, first=200)  # c (6 blocks) does not fit beside them
    sched.add(d)
    sched.add(c)
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("a", 1), ("d", 20)]
    assert list(sched.waiting) == [c, b] and b.num_computed_tokens == 0 and sched.num_preemptions == 1
    e = seq("e", 24, first=300)
    sched.add(e)
    assert list(sched.waiting) == [c, e, b]
    sched.finish(c, "abort")
    sched.finish(e, "abort")
    sched.finish(d, "stop")
    work, _ = sched.schedule()  # b resumes once it is the head and fits
    assert [s.seq_id for s, _ in work] == ["a", "b"] and not sched.waiting
    sched.add(c)
    assert list(sched.waiting) == [c]  # nothing resumed is left waiting: a plain append
    check_invariants(sched.block_manager, sched.running)


def test_only_a_prompt_not_started_preempts_and_only_when_it_then_fits() -> None:
    sched = Scheduler(BlockManager(8, B, lambda: 0.0), 8, 100, preempt_for_prompts=True)
    a = seq("a", 7)
    sched.add(a)
    compute(sched, sched.schedule()[0])
    big = seq("big", 40, first=100)  # 10 blocks: more than the whole cache, finished as too long
    sched.add(big)
    work, too_long = sched.schedule()
    assert too_long == [big] and [s.seq_id for s, _ in work] == ["a"]
    e = seq("e", 29, first=300)  # 8 blocks: fits only if a goes, and a is its only victim
    sched.add(e)
    assert sched.decodes_to_preempt() == [a]
    work, _ = sched.schedule()
    assert [s.seq_id for s, _ in work] == ["e"] and list(sched.waiting) == [a]
    # a resumed sequence (its first token is out) preempts nobody: it waits for room
    assert sched.decodes_to_preempt() == [] and a.status is SequenceStatus.WAITING
    off = make(num_blocks=8, budget=100)
    f = seq("f", 7)
    off.add(f)
    compute(off, off.schedule()[0])
    off.add(seq("g", 29, first=300))
    assert [s.seq_id for s, _ in off.schedule()[0]] == ["f"]  # off by default: the prompt waits


def pseq(seq_id: str, length: int, priority: int, first: int = 0) -> Sequence:
    s = seq(seq_id, length, first)
    s.priority = priority
    return s


def test_priority_scheduling_orders_the_queue_first_come_first_served_within_a_priority() -> None:
    sched = Scheduler(BlockManager(8, B, lambda: 0.0), 8, 100, priority_threshold=10)
    a, low, b, high = pseq("a", 4, 0), pseq("low", 4, -11), pseq("b", 4, 0), pseq("high", 4, 5)
    for s in (a, low, b, high):
        sched.add(s)
    assert list(sched.waiting) == [high, a, b, low]


def test_a_request_preempts_only_what_it_outranks_by_more_than_the_threshold() -> None:
    """Known by construction: 8 blocks; a (priority -11) and b (-10) decode in 2 blocks each; d
    (priority 0) needs 5: it outranks a by 11 > 10 and b by 10, not more, so only a goes, and that
    frees enough. The preempted a queues at the front of its priority, behind d's; e (priority 0)
    needs 7 blocks, and nothing it outranks by more than 10 is running: it waits, preempting nobody."""
    sched = Scheduler(BlockManager(8, B, lambda: 0.0), 8, 100, priority_threshold=10)
    a, b = pseq("a", 7, -11), pseq("b", 7, -10, first=50)
    for s in (a, b):
        sched.add(s)
    compute(sched, sched.schedule()[0])  # both prefilled, first token out: 2 blocks each
    y = pseq("y", 4, -11, first=400)  # waits behind every priority-0 prompt
    d = pseq("d", 20, 0, first=100)
    sched.add(y)
    sched.add(d)
    assert list(sched.waiting) == [d, y]
    assert sched.decodes_to_preempt() == [a]
    work, _ = sched.schedule()
    assert [(s.seq_id, n) for s, n in work] == [("b", 1), ("d", 20)]
    assert list(sched.waiting) == [a, y] and a.num_computed_tokens == 0 and sched.num_preemptions == 1
    e = pseq("e", 28, 0, first=200)
    sched.add(e)
    assert list(sched.waiting) == [e, a, y] and sched.decodes_to_preempt() == []
    check_invariants(sched.block_manager, sched.running)


def test_the_lowest_priority_goes_first_and_only_as_many_as_make_it_fit() -> None:
    """8 blocks: a (-20), b (-11), c (-20, admitted after a) decode in 2 blocks each, 2 free; d (0)
    needs 6: the -20s go first, the latest admitted first (c, then a), and b stays."""
    sched = Scheduler(BlockManager(8, B, lambda: 0.0), 8, 100, priority_threshold=10)
    a, b, c = pseq("a", 7, -20), pseq("b", 7, -11, first=50), pseq("c", 7, -20, first=90)
    for s in (a, b, c):
        sched.add(s)
    assert list(sched.waiting) == [b, a, c]
    compute(sched, sched.schedule()[0])
    sched.add(pseq("d", 24, 0, first=100))
    assert sched.decodes_to_preempt() == [c, a]
    sched.add(pseq("x", 40, 0, first=300))  # behind d; would never fit: no effect on d's victims
    assert sched.decodes_to_preempt() == [c, a]


def test_equal_priorities_schedule_exactly_as_first_come_first_served() -> None:
    """A client that sends no priority (every request 0) sees the first-come-first-served scheduler:
    the same steps, the same preemptions, under memory pressure."""
    import random

    rng = random.Random(7)
    plain = Scheduler(BlockManager(24, B, lambda: 0.0), 4, 12)
    ranked = Scheduler(BlockManager(24, B, lambda: 0.0), 4, 12, priority_threshold=0)
    for step in range(200):
        if rng.random() < 0.3:
            length, first = rng.randint(2, 40), rng.randint(0, 3) * 1000
            for sched in (plain, ranked):
                sched.add(seq(f"s{step}", length, first))
        works = [sched.schedule() for sched in (plain, ranked)]
        assert [[(s.seq_id, n) for s, n in w] for w, _ in works] == [
            [(s.seq_id, n) for s, n in w] for w, _ in works[:1]
        ] * 2
        for sched, (work, _too_long) in zip((plain, ranked), works, strict=True):
            compute(sched, work)
            for s in [s for s, _ in work if s.num_output_tokens >= 5]:
                sched.finish(s, "stop")
    assert plain.num_preemptions == ranked.num_preemptions > 0


def test_priority_scheduling_and_preempt_for_prompts_are_two_engines() -> None:
    with pytest.raises(ValueError):
        Scheduler(BlockManager(8, B, lambda: 0.0), 8, 100, preempt_for_prompts=True, priority_threshold=10)


def test_a_sequence_waiting_for_its_onboarded_blocks_sits_out_until_they_land() -> None:
    """`onboard_async`: a running sequence whose `ready_at` is later than now computes nothing; the
    others do; once now reaches it, its pending tokens are scheduled. A preempted one forgets it."""
    sched = Scheduler(BlockManager(16, B, lambda: 0.0), 8, 100, onboard_async=True)
    a, b = seq("a", 7), seq("b", 9, first=50)
    for s in (a, b):
        sched.add(s)
    compute(sched, sched.schedule(0.0)[0])
    b.ready_at = 2.0  # as if b's blocks were on the link until t = 2
    assert [s.seq_id for s, _ in sched.schedule(1.0)[0]] == ["a"]
    assert [s.seq_id for s, _ in sched.schedule(2.0)[0]] == ["a", "b"]
    b.ready_at = 5.0
    sched.running.remove(b)
    sched._preempt(b)
    assert b.ready_at == 0.0 and list(sched.waiting) == [b]
