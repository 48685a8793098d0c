"""Scheduler: token budget, admission order and limits, preemption by recompute, too-long sequences."""

from __future__ import annotations

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
