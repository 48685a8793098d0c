"""Block manager: prefix hits, LRU reuse, pins, and hypothesis-driven invariants with exact events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.block_manager import BlockManager
from engines.runner import SamplingParams
from engines.sequence import Sequence
from router.hashing import BASE_SEED, block_hashes
from router.protocol import BlockRemoved, BlockStored
from tests.engines.kv_replay import ReplayedCache, cached_set, check_invariants
from tests.engines.reference_block_manager import ReferenceBlockManager

B = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams(), B, BASE_SEED, [])


def run_prefill(bm: BlockManager, seq: Sequence) -> int:
    """Admit and compute a sequence's whole prompt; returns its prefix hit in blocks."""
    hits = bm.match_prefix(seq)
    assert bm.can_allocate(seq, hits)
    bm.allocate(seq, hits)
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)
    return hits


def prefill_and_free(bm: BlockManager, seq: Sequence) -> None:
    """Compute a sequence's prompt and finish it: its blocks stay cached, free to evict."""
    run_prefill(bm, seq)
    bm.free(seq)


def test_stored_events_carry_the_router_hashes_and_a_prefix_hit_follows() -> None:
    bm = BlockManager(16, B, Clock())
    prompt = list(range(100, 118))  # 4 full blocks and 2 tokens
    first = make_seq("a", prompt)
    assert run_prefill(bm, first) == 0
    assert bm.take_events() == [BlockStored(block_hashes(prompt, B), None)]
    bm.free(first)
    second = make_seq("b", [*prompt, 7, 7])
    assert run_prefill(bm, second) == 4
    assert second.num_cached_tokens == 16
    # the partial block of the first sequence was never cached; the second completes block 4
    assert bm.take_events() == [BlockStored(block_hashes([*prompt, 7, 7], B)[4:], block_hashes(prompt, B)[3])]


def test_a_full_prefix_hit_still_computes_the_last_token() -> None:
    bm = BlockManager(16, B, Clock())
    prompt = list(range(8))
    prefill_and_free(bm, make_seq("a", prompt))
    again = make_seq("b", prompt)
    assert bm.match_prefix(again) == 1  # not 2: the last block's last token is recomputed


def test_eviction_takes_least_recently_freed_and_tail_first() -> None:
    bm = BlockManager(4, B, Clock())
    old = make_seq("old", list(range(8)))
    run_prefill(bm, old)
    bm.free(old)
    new = make_seq("new", list(range(50, 58)))
    run_prefill(bm, new)
    bm.free(new)
    bm.take_events()
    # 2 blocks needed from 4 cached free ones: the old chain goes, tail block first
    third = make_seq("third", list(range(90, 97)))
    run_prefill(bm, third)
    old_hashes = block_hashes(list(range(8)), B)
    assert bm.take_events()[0] == BlockRemoved([old_hashes[1], old_hashes[0]])
    assert all(bm.is_cached(h) for h in block_hashes(list(range(50, 58)), B))


def test_pins_are_evicted_last_never_refuse_and_expire() -> None:
    clock = Clock()
    bm = BlockManager(4, B, clock, max_pinned_blocks=4)
    pinned_tokens, other_tokens = list(range(8)), list(range(50, 58))
    pinned, other = make_seq("p", pinned_tokens), make_seq("o", other_tokens)
    run_prefill(bm, pinned)
    run_prefill(bm, other)
    bm.free(pinned)  # freed first: plain LRU would evict it first
    bm.free(other)
    assert bm.pin("s1", block_hashes(pinned_tokens, B), ttl_s=10) == 2
    run_prefill(bm, make_seq("x", list(range(90, 97))))
    assert all(bm.is_cached(h) for h in block_hashes(pinned_tokens, B))
    assert not any(bm.is_cached(h) for h in block_hashes(other_tokens, B))
    # a pin never refuses admission: a 4-block prompt still gets every block
    big = make_seq("big", list(range(200, 216)))
    bm2 = BlockManager(4, B, clock, max_pinned_blocks=4)
    seq = make_seq("p", pinned_tokens)
    run_prefill(bm2, seq)
    bm2.free(seq)
    bm2.pin("s1", block_hashes(pinned_tokens, B), ttl_s=10)
    assert run_prefill(bm2, big) == 0
    assert not any(bm2.is_cached(h) for h in block_hashes(pinned_tokens, B))
    # pins expire by the injected clock
    bm.pin("s2", [1, 2, 3], ttl_s=5)
    clock.now = 6
    bm.expire_pins()
    assert set(bm.pinned_sessions()) == {"s1"}
    clock.now = 11
    bm.expire_pins()
    assert bm.pinned_sessions() == {} and bm.num_pinned == 0


def test_pinned_blocks_are_evicted_tail_first() -> None:
    # a lost head makes the rest of a chain unmatchable: when pinned blocks must go, the tail goes first
    bm = BlockManager(4, B, Clock(), max_pinned_blocks=4)
    tokens = list(range(16))  # 4 blocks
    prefill_and_free(bm, make_seq("p", tokens))
    chain = block_hashes(tokens, B)
    assert bm.pin("s1", chain, ttl_s=10) == 4
    bm.take_events()
    run_prefill(bm, make_seq("x", list(range(90, 97))))  # needs 2 of the 4 pinned blocks
    assert bm.take_events()[0] == BlockRemoved([chain[3], chain[2]])
    assert bm.match_prefix(make_seq("again", [*tokens, 1])) == 2


def test_an_ended_pin_does_not_send_a_shared_prefix_to_the_front() -> None:
    # s1 pinned the system prompt with its turn; other sessions' turns on that prompt were freed before
    # s1's pin ended. The prompt must not be evicted before their blocks (that orphans their chains).
    clock = Clock()
    bm = BlockManager(8, B, clock)
    system = list(range(8))  # 2 blocks
    s1 = make_seq("s1", [*system, *range(20, 24), 0])
    s2 = make_seq("s2", [*system, *range(30, 34), 0])
    run_prefill(bm, s1)
    bm.free(s1)
    bm.pin("s1", block_hashes([*system, *range(20, 24)], B), ttl_s=5)
    run_prefill(bm, s2)
    bm.free(s2)
    clock.now = 6
    bm.expire_pins()
    bm.take_events()
    run_prefill(bm, make_seq("x", list(range(90, 114))))  # 6 blocks: the 4 uncached, then 2 evicted
    tails = [block_hashes([*system, *range(k, k + 4)], B)[2] for k in (30, 20)]
    assert bm.take_events()[0] == BlockRemoved(tails)  # both sessions' own blocks, the prompt kept
    assert bm.match_prefix(make_seq("s3", [*system, 5])) == 2


def test_pins_are_capped_keeping_the_prefix() -> None:
    bm = BlockManager(8, B, Clock(), max_pinned_blocks=3)
    assert bm.pin("a", [1, 2], 10) == 2
    assert bm.pin("b", [3, 4, 5], 10) == 1
    assert bm.pinned_sessions() == {"a": [1, 2], "b": [3]}
    assert bm.pin("a", [6], 10) == 1  # re-pinning a session replaces its pin
    assert bm.num_pinned == 2


# --- properties

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(0, 3), st.integers(1, 14)),
        st.tuples(st.just("compute"), st.integers(0, 20), st.integers(1, 24)),
        st.tuples(st.just("free"), st.integers(0, 20)),
        st.tuples(st.just("free"), st.integers(0, 20)),
        st.tuples(st.just("pin"), st.integers(0, 20), st.integers(0, 30)),
        st.tuples(st.just("tick"), st.integers(1, 20)),
    ),
    min_size=20,
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_invariants_and_event_exactness_under_random_operations(operations: list[tuple]) -> None:
    """Sequences share prefixes (a few stems), grow, free and get pinned while blocks run short;
    after every operation the invariants hold and the replayed events equal the cached set."""
    clock = Clock()
    bm = BlockManager(9, B, clock, max_pinned_blocks=4)
    replay = ReplayedCache()
    live: list[Sequence] = []
    count = 0
    for op in operations:
        kind = op[0]
        if kind == "add":
            _, stem, variant, length = op
            tokens = [stem] * 6 + [variant + 10 * i for i in range(length)]
            seq = make_seq(f"s{count}", tokens)
            count += 1
            hits = bm.match_prefix(seq)
            if bm.can_allocate(seq, hits):
                bm.allocate(seq, hits)
                assert seq.num_computed_tokens < len(seq)
                live.append(seq)
        elif kind == "compute" and live:
            seq = live[op[1] % len(live)]
            seq.num_computed_tokens = min(len(seq), seq.num_computed_tokens + op[2])
            bm.commit(seq)
            if seq.num_computed_tokens == len(seq) and bm.can_append(seq, 1):
                seq.token_ids.append(op[2])  # a sampled token, whose KV is computed next
                bm.append_slots(seq, 1)
        elif kind == "free" and live:
            bm.free(live.pop(op[1] % len(live)))
        elif kind == "pin" and live:
            seq = live[op[1] % len(live)]
            bm.pin(f"sess{op[1] % 3}", seq.block_hashes[: seq.num_committed_blocks], ttl_s=op[2])
        elif kind == "tick":
            clock.now += op[1]
            bm.expire_pins()
        replay.apply(bm.take_events())
        check_invariants(bm, live)
        assert replay.blocks == cached_set(bm)
    for seq in live:
        bm.free(seq)
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    assert bm.reset()
    replay.apply(bm.take_events())
    assert replay.blocks == cached_set(bm) == {}


twin_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 1), st.integers(0, 1), st.integers(1, 30)),
        # given block hashes (as the simulator hands its trace's over) that repeat with a period: a hash
        # listed twice in one sequence, and blocks whose content is cached elsewhere already
        st.tuples(st.just("add_given"), st.integers(0, 1), st.integers(1, 30), st.integers(1, 4)),
        st.tuples(st.just("compute"), st.integers(0, 20), st.integers(1, 40)),
        st.tuples(st.just("free"), st.integers(0, 20)),
        st.tuples(st.just("pin"), st.integers(0, 20), st.integers(0, 30)),
        # a pin of every 2nd or 3rd block: pinned blocks that are not a chain's head
        st.tuples(st.just("pin_some"), st.integers(0, 20), st.integers(0, 30), st.integers(2, 3)),
        st.tuples(st.just("probe"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("tick"), st.integers(1, 20)),
    ),
    min_size=20,
    max_size=150,
)


def free_order(bm: BlockManager | ReferenceBlockManager) -> tuple[list[int], list[int], list[int]]:
    """The block ids of each free list, in eviction order (the manager keys its orders by hash)."""
    if isinstance(bm, BlockManager):
        return list(bm._uncached), list(bm._evictable.values()), list(bm._pinned_free.values())
    return list(bm._uncached), list(bm._evictable), list(bm._pinned_free)


@settings(max_examples=300, deadline=None)
@given(twin_ops)
def test_the_block_manager_matches_the_per_block_reference(operations: list[tuple]) -> None:
    """The same operations on the manager and the per-block reference give the same block ids,
    events, prefix matches and eviction order at every point (the simulator's numbers rest on it)."""
    clock = Clock()
    fast = BlockManager(16, B, clock, max_pinned_blocks=6)
    ref = ReferenceBlockManager(16, B, clock, max_pinned_blocks=6)
    live: list[tuple[Sequence, Sequence]] = []
    waiting: list[tuple[Sequence, Sequence]] = []
    count = 0
    for op in operations:
        kind = op[0]
        if kind == "add":
            _, stem, variant, length = op
            tokens = [stem] * 10 + [variant + 10 * i for i in range(length)]
            pair = (make_seq(f"s{count}", tokens), make_seq(f"s{count}", tokens))
            count += 1
            waiting.append(pair)
        elif kind == "add_given":
            _, stem, length, period = op
            tokens = [stem] * 10 + list(range(length))
            given = [1000 * (stem + 1) + i % period for i in range(len(tokens) // B)]
            pair = (make_seq(f"s{count}", tokens), make_seq(f"s{count}", tokens))
            for seq in pair:
                seq.block_hashes = list(given)
            count += 1
            waiting.append(pair)
        elif kind == "probe" and waiting:
            # the waiting head asked again and again, as the scheduler does, while the cache changes
            index = op[1] % len(waiting)
            a, b = waiting[index]
            hits = fast.match_prefix(a)
            assert hits == ref.match_prefix(b)
            fits = fast.can_allocate(a, hits)
            assert fits == ref.can_allocate(b, hits)
            if fits and op[2]:
                fast.allocate(a, hits)
                ref.allocate(b, hits)
                live.append(waiting.pop(index))
        elif kind == "compute" and live:
            a, b = live[op[1] % len(live)]
            for seq, bm in ((a, fast), (b, ref)):
                seq.num_computed_tokens = min(len(seq), seq.num_computed_tokens + op[2])
                bm.commit(seq)
                if seq.num_computed_tokens == len(seq) and bm.can_append(seq, 1):
                    seq.token_ids.append(op[2])
                    bm.append_slots(seq, 1)
        elif kind == "free" and live:
            a, b = live.pop(op[1] % len(live))
            fast.free(a)
            ref.free(b)
        elif kind == "pin" and live:
            a, b = live[op[1] % len(live)]
            session = f"sess{op[1] % 3}"
            pinned = fast.pin(session, a.block_hashes[: a.num_committed_blocks], ttl_s=op[2])
            assert pinned == ref.pin(session, b.block_hashes[: b.num_committed_blocks], ttl_s=op[2])
        elif kind == "pin_some" and live:
            a, b = live[op[1] % len(live)]
            session = f"sess{op[1] % 3}"
            step = op[3]
            pinned = fast.pin(session, a.block_hashes[: a.num_committed_blocks : step], ttl_s=op[2])
            assert pinned == ref.pin(session, b.block_hashes[: b.num_committed_blocks : step], ttl_s=op[2])
        elif kind == "tick":
            clock.now += op[1]
            fast.expire_pins()
            ref.expire_pins()
        assert fast.take_events() == ref.take_events()
        assert free_order(fast) == free_order(ref)
        assert fast._by_hash == ref._by_hash
        assert fast._pin_counts == ref._pin_counts
        assert fast.num_used == ref.num_used
        assert fast.cached_blocks() == ref.cached_blocks()
        assert [b.ref_count for b in ref.blocks] == fast.ref_counts
        for a, b in live:
            assert a.block_table == b.block_table
            assert a.num_committed_blocks == b.num_committed_blocks


def test_a_waiting_sequence_sees_blocks_committed_since_it_was_last_matched() -> None:
    """The remembered prefix match of a waiting sequence grows with the cache, and shrinks on eviction."""
    bm = BlockManager(8, B, Clock())
    first = make_seq("a", list(range(20)))
    waiting = make_seq("w", [*range(20), 99, 98])
    assert bm.match_prefix(waiting) == 0
    bm.allocate(first, bm.match_prefix(first))
    first.num_computed_tokens = 10
    bm.commit(first)
    assert bm.match_prefix(waiting) == 2
    first.num_computed_tokens = 20
    bm.commit(first)
    assert bm.match_prefix(waiting) == 5
    bm.free(first)
    other = make_seq("o", [7] * 24)  # takes the 3 uncached blocks and evicts the tail of `first`
    bm.allocate(other, bm.match_prefix(other))
    assert bm.match_prefix(waiting) == 2


agent_turns = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 12), st.integers(0, 3), st.integers(0, 30)),
    min_size=5,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(agent_turns)
def test_a_session_pinning_again_leaves_the_reference_order(turns: list[tuple]) -> None:
    """Agent turns: each session's prompt grows, is computed, freed and pinned again (the old pin's
    free blocks kept, dropped or cut by the cap), with shared stems and expiries in between."""
    run_agent_turns(turns)


edited_turns = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(0, 12), st.integers(0, 3), st.integers(0, 30), st.integers(0, 10)
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(edited_turns)
def test_a_session_whose_last_blocks_change_leaves_the_reference_order(turns: list[tuple]) -> None:
    """As above, but a turn may rewrite the session's last tokens before growing (a trace's partial last
    block filled in, an edited message): the new pin leaves the old one at some block, not at its end."""
    run_agent_turns(turns, max_pinned=12)


def run_agent_turns(turns: list[tuple], max_pinned: int = 7) -> None:
    clock = Clock()
    fast = BlockManager(24, B, clock, max_pinned_blocks=max_pinned)
    ref = ReferenceBlockManager(24, B, clock, max_pinned_blocks=max_pinned)
    grown: dict[int, list[int]] = {}
    for n, (session, grow, cut, ttl, *edit) in enumerate(turns):
        tokens = grown.setdefault(session, [session % 2] * 8)
        if edit and edit[0] and len(tokens) > 8:
            rewrite = min(edit[0], len(tokens) - 8)
            tokens[-rewrite:] = [7000 + n * 16 + i for i in range(rewrite)]
        tokens.extend(100 * (session + 1) + len(tokens) + i for i in range(grow))
        pair = (make_seq(f"t{n}", list(tokens)), make_seq(f"t{n}", list(tokens)))
        for seq, bm in zip(pair, (fast, ref), strict=True):
            hits = bm.match_prefix(seq)
            if bm.can_allocate(seq, hits):
                bm.allocate(seq, hits)
                seq.num_computed_tokens = len(seq)
                bm.commit(seq)
                bm.free(seq)
        chain = pair[0].hashes(len(tokens) // B)
        chain = chain[: max(0, len(chain) - cut)]
        assert fast.pin(f"sess{session}", chain, ttl) == ref.pin(f"sess{session}", chain, ttl)
        clock.now += 3
        assert fast.take_events() == ref.take_events()
        assert free_order(fast) == free_order(ref)
        assert fast._pin_counts == ref._pin_counts and fast.num_pinned == ref.num_pinned
        assert fast.pinned_sessions() == ref.pinned_sessions()


# --- the host tier


def test_an_evicted_chain_goes_to_the_host_and_comes_back_onboarded() -> None:
    bm = BlockManager(4, B, Clock(), host_blocks=8)
    tokens = list(range(16))  # 4 blocks
    chain = block_hashes(tokens, B)
    first = make_seq("a", tokens)
    run_prefill(bm, first)
    bm.free(first)
    bm.take_events()
    run_prefill(bm, other := make_seq("x", list(range(90, 106))))  # evicts all 4, tail first
    assert bm.take_events() == [
        BlockStored(chain, None, "host"),
        BlockRemoved([chain[3], chain[2], chain[1], chain[0]]),
        BlockStored(block_hashes(list(range(90, 106)), B), None),
    ]
    copies = bm.take_copies()
    assert [h for h in bm.host.droppable_in_order()] == chain[::-1]  # tail first, as evicted
    assert sorted(b for b, _ in copies.offloads) == [0, 1, 2, 3] and not copies.onboards
    bm.free(other)
    again = make_seq("b", tokens)  # the last block's last token is computed: 3 blocks onboarded
    hits = bm.match_prefix(again)
    assert hits == 0 and bm.match_host(again, hits) == 3
    bm.allocate(again, hits, 3)
    assert again.num_computed_tokens == 12 and again.num_cached_tokens == 12
    assert again.num_host_cached_tokens == 12
    assert bm.host.num_claimed == 3
    events = bm.take_events()
    assert events[0] == BlockRemoved(chain[:3], "host")
    assert BlockStored(chain[:3], None) in events
    copies = bm.take_copies()
    assert [b for _, b in copies.onboards] == again.block_table[:3]
    assert bm.host.num_claimed == 0 and chain[3] in bm.host and len(bm.host) == 5  # + x's 4 blocks


def test_a_prefetch_brings_a_chain_back_as_free_cached_blocks() -> None:
    bm = BlockManager(8, B, Clock(), host_blocks=8)
    tokens = list(range(16))
    chain = block_hashes(tokens, B)
    prefill_and_free(bm, make_seq("a", tokens))
    assert bm.offload(chain) == 4 and all(h in bm.host for h in chain)
    bm.take_copies()
    bm.take_events()
    assert bm.prefetch(chain) == 4
    assert all(bm.is_cached(h) for h in chain) and len(bm.host) == 0 and bm.num_used == 0
    assert list(bm._evictable) == chain[::-1]  # as if freed now: tail first
    assert len(bm.take_copies().onboards) == 4
    events = bm.take_events()  # each tier's events in order; the tiers' relative order is free
    assert len(events) == 2 and BlockRemoved(chain, "host") in events and BlockStored(chain, None) in events
    assert bm.match_prefix(make_seq("b", [*tokens, 1])) == 4


def test_a_prefetch_in_chunks_continues_the_device_prefix() -> None:
    bm = BlockManager(8, B, Clock(), host_blocks=8)
    tokens = list(range(20))
    chain = block_hashes(tokens, B)
    prefill_and_free(bm, make_seq("a", tokens))
    assert bm.offload(chain) == 5
    assert [bm.prefetch(chain, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert all(bm.is_cached(h) for h in chain) and len(bm.host) == 0
    assert list(bm._evictable) == chain[::-1]  # the whole chain, as if freed now: tail first
    onboards = bm.take_copies().onboards
    assert len(onboards) == 5 and len({b for _, b in onboards}) == 5


def test_a_host_tier_smaller_than_the_eviction_keeps_the_chain_head() -> None:
    bm = BlockManager(4, B, Clock(), host_blocks=2)
    tokens = list(range(16))
    chain = block_hashes(tokens, B)
    prefill_and_free(bm, make_seq("a", tokens))
    run_prefill(bm, make_seq("x", list(range(90, 106))))
    assert sorted(bm.host.parent_of) == sorted(chain[:2])
    assert bm.match_host(make_seq("b", [*tokens, 1]), 0) == 2


def test_a_block_kept_on_host_is_dropped_last() -> None:
    clock = Clock()
    bm = BlockManager(2, B, clock, host_blocks=2)
    kept, other, third = list(range(8)), list(range(20, 28)), list(range(40, 48))
    for tokens in (kept, other):
        prefill_and_free(bm, make_seq(f"s{tokens[0]}", tokens))
    bm.keep_on_host("sess", block_hashes(kept, B), ttl_s=10)
    prefill_and_free(bm, make_seq("t", third))  # the host holds `kept` and `other`'s: it drops `other`'s
    run_prefill(bm, make_seq("u", list(range(60, 68))))
    assert all(h in bm.host for h in block_hashes(kept, B))
    clock.now = 11
    bm.expire_pins()
    assert not bm.host.is_kept(block_hashes(kept, B)[0])


def test_bad_host_sizes_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="host_blocks"):
        BlockManager(4, B, Clock(), host_blocks=-1)


host_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 3), st.integers(1, 20)),
        st.tuples(st.just("compute"), st.integers(0, 20), st.integers(1, 24)),
        st.tuples(st.just("free"), st.integers(0, 20)),
        st.tuples(st.just("pin"), st.integers(0, 20), st.integers(0, 30)),
        st.tuples(st.just("keep"), st.integers(0, 20), st.integers(0, 30)),
        st.tuples(st.just("offload"), st.integers(0, 2), st.integers(0, 3), st.integers(1, 20)),
        st.tuples(
            st.just("prefetch"),
            st.integers(0, 2),
            st.integers(0, 3),
            st.integers(1, 20),
            st.one_of(st.none(), st.integers(1, 6)),
        ),
        st.tuples(st.just("tick"), st.integers(1, 20)),
    ),
    min_size=20,
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(host_ops, st.integers(1, 12))
def test_host_tier_invariants_copies_and_events_under_random_operations(
    operations: list[tuple], host_blocks: int
) -> None:
    """Device and host tiers under pressure: after every operation the tiers are exclusive, every
    count adds up, the events replayed (per tier, and into the router's index) equal both cached sets,
    and running the copies in order leaves each cached block's content equal to its hash."""
    from router.index import BlockIndex

    clock = Clock()
    bm = BlockManager(9, B, clock, max_pinned_blocks=4, host_blocks=host_blocks)
    replay = ReplayedCache()
    index = BlockIndex()
    index.add_worker("w", 1000)
    device: dict[int, int | None] = {}  # block id -> the hash whose KV it holds
    host: dict[int, int | None] = {}  # host slot -> the hash whose KV it holds
    live: list[Sequence] = []

    def run_copies() -> None:
        copies = bm.take_copies()
        for block_id, slot in copies.offloads:
            host[slot] = device.get(block_id)
        for slot, block_id in copies.onboards:
            device[block_id] = host.get(slot)

    count = 0
    for op in operations:
        kind = op[0]
        if kind == "add":
            _, stem, variant, length = op
            seq = make_seq(f"s{count}", [stem] * 6 + [variant + 10 * i for i in range(length)])
            count += 1
            hits = bm.match_prefix(seq)
            if bm.can_allocate(seq, hits):
                onboard = bm.match_host(seq, hits)
                bm.allocate(seq, hits, onboard)
                assert seq.num_computed_tokens == (hits + onboard) * B < len(seq)
                live.append(seq)
        elif kind == "compute" and live:
            seq = live[op[1] % len(live)]
            done = seq.num_computed_tokens // B
            seq.num_computed_tokens = min(len(seq), seq.num_computed_tokens + op[2])
            for i in range(done, seq.num_computed_tokens // B):  # the step writes their KV
                device[seq.block_table[i]] = seq.block_hash(i)
            bm.commit(seq)
            if seq.num_computed_tokens == len(seq) and bm.can_append(seq, 1):
                seq.token_ids.append(op[2])
                bm.append_slots(seq, 1)
        elif kind == "free" and live:
            bm.free(live.pop(op[1] % len(live)))
        elif kind == "pin" and live:
            seq = live[op[1] % len(live)]
            bm.pin(f"sess{op[1] % 3}", seq.block_hashes[: seq.num_committed_blocks], ttl_s=op[2])
        elif kind == "keep" and live:
            seq = live[op[1] % len(live)]
            bm.keep_on_host(f"sess{op[1] % 3}", seq.block_hashes[: seq.num_committed_blocks], ttl_s=op[2])
        elif kind == "offload":  # a session's chain (some of it in use, some not cached) moved down
            _, stem, variant, length = op
            tokens = [stem] * 6 + [variant + 10 * i for i in range(length)]
            bm.offload(block_hashes(tokens, B))
        elif kind == "prefetch":  # its next turn is due: back to the device, as free cached blocks
            _, stem, variant, length, limit = op
            tokens = [stem] * 6 + [variant + 10 * i for i in range(length)]
            used, pinned_free = bm.num_used, dict(bm._pinned_free)
            assert bm.prefetch(block_hashes(tokens, B), limit) <= (limit or length)
            assert bm.num_used == used and pinned_free.items() <= bm._pinned_free.items()
        elif kind == "tick":
            clock.now += op[1]
            bm.expire_pins()
        run_copies()
        events = bm.take_events()
        replay.apply(events)
        index.apply("w", events)
        check_invariants(bm, live)
        assert replay.blocks == cached_set(bm) and replay.host == cached_set(bm, "host")
        assert index.blocks_of("w") == len(replay.blocks) + len(replay.host)
        for block_hash, block_id in bm._by_hash.items():
            assert device.get(block_id) == block_hash, "a cached device block holds other KV"
        for block_hash in bm.host.parent_of:
            assert host.get(bm.host.slot_of(block_hash)) == block_hash, "a host block holds other KV"
    for seq in live:
        bm.free(seq)
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    assert bm.reset()
    replay.apply(bm.take_events())
    assert replay.blocks == replay.host == {} and bm.cached_blocks() == []
