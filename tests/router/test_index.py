"""The block index against a brute-force model, on random (not prefix-closed) event streams."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from router.index import BlockIndex
from router.prefix_match import expand
from router.protocol import TIERS, AllBlocksCleared, BlockRemoved, BlockStored, CachedBlock, KvEvent
from router.tier_index import TierIndex

WORKERS = ("a", "b", "c")


class Forest:
    """Block ids with fixed parents, as the chained hash fixes them: node i's parent is parents[i]."""

    def __init__(self, parents: list[int | None]) -> None:
        self.parents = parents

    def chain(self, node: int) -> list[int]:
        out = []
        cur: int | None = node
        while cur is not None:
            out.append(cur + 1000)  # block hashes; 1000 + node keeps them apart from positions
            cur = self.parents[cur]
        return out[::-1]


@st.composite
def forests(draw) -> Forest:
    n = draw(st.integers(2, 24))
    parents: list[int | None] = [None]
    for i in range(1, n):
        parents.append(draw(st.one_of(st.none(), st.integers(0, i - 1))))
    return Forest(parents)


def held_only(hashes: list[int], held: set[int]) -> list[int]:
    """An eviction's blocks that the worker holds, in their order."""
    return [h for h in hashes if h in held]


def to_event(op: tuple, model: dict) -> KvEvent | None:
    """A stream op as the event its worker sends, with the brute-force model (tier -> worker -> held
    set) updated; None for "readd" (the worker leaves and comes back empty)."""
    kind, worker, tier, hashes, parent = op
    if kind == "evict":
        kind, hashes = "remove", held_only(hashes, model[tier][worker])
    if kind == "store":
        model[tier][worker].update(hashes)
        return BlockStored(hashes, parent, tier)
    if kind == "remove":
        model[tier][worker].difference_update(hashes)
        return BlockRemoved(hashes, tier)
    for t in TIERS:
        model[t][worker].clear()
    return AllBlocksCleared() if kind == "clear" else None


def brute_overlap(held: dict[str, set[int]], chain: list[int]) -> dict[str, int]:
    out = {}
    for w, blocks in held.items():
        n = 0
        while n < len(chain) and chain[n] in blocks:
            n += 1
        if n:
            out[w] = n
    return out


KINDS = ("store", "store", "store", "remove", "evict", "evict", "clear", "readd")


@st.composite
def streams(draw, tiers: tuple = TIERS, kinds: tuple = KINDS):
    forest = draw(forests())
    n_nodes = len(forest.parents)
    ops = []
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(kinds))
        worker = draw(st.sampled_from(WORKERS))
        tier = draw(st.sampled_from(tiers))
        if kind == "store":
            chain = forest.chain(draw(st.integers(0, n_nodes - 1)))
            i = draw(st.integers(0, len(chain) - 1))
            j = draw(st.integers(i + 1, len(chain)))
            ops.append(("store", worker, tier, chain[i:j], chain[i - 1] if i else None))
        elif kind == "remove":
            nodes = draw(st.lists(st.integers(0, n_nodes - 1), max_size=6))
            ops.append(("remove", worker, tier, [x + 1000 for x in nodes], None))
        elif kind == "evict":  # as engines evict: chains from their leaves, several in one event, of
            hashes = []  # the blocks the worker holds (picked when the stream runs)
            for _ in range(draw(st.integers(1, 3))):
                chain = forest.chain(draw(st.integers(0, n_nodes - 1)))
                i = draw(st.integers(0, len(chain) - 1))
                j = draw(st.integers(i + 1, len(chain)))
                hashes += chain[i:j][::-1]
            ops.append(("evict", worker, tier, hashes, None))
        else:
            ops.append((kind, worker, tier, [], None))
    return forest, ops


@settings(max_examples=300, deadline=None)
@given(streams())
def test_overlap_matches_brute_force_on_random_streams(stream) -> None:
    forest, ops = stream
    index = BlockIndex()
    for w in WORKERS:
        index.add_worker(w, 10_000)
    model = {t: {w: set() for w in WORKERS} for t in TIERS}
    for op in ops:
        worker = op[1]
        event = to_event(op, model)
        if event is not None:
            index.apply(worker, [event])
        else:  # the worker leaves and comes back empty
            index.remove_worker(worker)
            index.add_worker(worker, 10_000)
        index.sweep(budget=3)  # dropped workers' bits come off a few entries at a time
        for node in range(len(forest.parents)):
            chain = forest.chain(node)
            for t in TIERS:
                assert index.overlap(chain, t) == brute_overlap(model[t], chain), (t, chain)
        assert index.blocks_of(worker) == sum(len(model[t][worker]) for t in TIERS)
    index.sweep_all()
    total = sum(len({h for w in WORKERS for h in model[t][w]}) for t in TIERS)
    assert len(index) == total  # nothing nobody holds is kept
    for t in TIERS:  # nor orphan marks of retired bits
        assert index.tiers[t].dirty_mask & ~index._live == 0


def test_worker_over_its_bound_is_cleared_and_asks_for_a_dump() -> None:
    index = BlockIndex()
    index.add_worker("a", 100)
    assert index.apply("a", [BlockStored(list(range(1, 101)))])
    assert not index.apply("a", [BlockStored([500], 100)])
    assert index.blocks_of("a") == 0
    assert index.overlap(list(range(1, 101))) == {}
    index.sweep_all()
    assert len(index) == 0


def test_state_dump_replaces_the_worker_blocks_in_any_order() -> None:
    index = BlockIndex()
    index.add_worker("a", 100)
    index.apply("a", [BlockStored([1, 2, 3])])
    blocks = [CachedBlock(12, 11), CachedBlock(10, None), CachedBlock(11, 10), CachedBlock(20, None, "host")]
    assert index.load_dump("a", blocks)
    assert index.overlap([1, 2, 3]) == {}
    assert index.overlap([10, 11, 12, 13]) == {"a": 3}
    assert index.overlap([20], "host") == {"a": 1}
    assert index.tiers["device"].dirty_mask == 0  # the child that came first was adopted


def test_memory_stays_bounded_under_an_endless_store_remove_stream() -> None:
    index = BlockIndex()
    index.add_worker("a", 1 << 20)
    index.add_worker("b", 1 << 20)
    rng = random.Random(1)
    root = 77
    for step in range(3000):  # many sessions under one shared root, each stored and evicted
        chain = [rng.getrandbits(64) for _ in range(8)]
        index.apply("a", [BlockStored([root]), BlockStored(chain, root)])
        index.apply("b", [BlockStored([root])])
        index.apply("a", [BlockRemoved(chain[::-1])])
        if step % 100 == 0:  # and workers restart now and then
            index.apply("b", [AllBlocksCleared(), BlockStored([root])])
            index.sweep(budget=2)
    device = index.tiers["device"]
    assert len(device) == 1
    kids = device._children.get(root)
    assert kids is None or isinstance(kids, int) or len(kids) <= 9


def test_a_prefix_with_thousands_of_live_children_keeps_every_link_and_prunes_rarely() -> None:
    """A system prompt shared by many sessions: each session's first block is one more child of the
    prompt's last block. Every link must stay (the prompt's eviction orphans them all), and the links
    are pruned of dead children only as their number doubles, not on every new one."""
    index = BlockIndex()
    index.add_worker("a", 1 << 20)
    root = 5
    index.apply("a", [BlockStored([root])])
    rng = random.Random(3)
    firsts = []
    for step in range(3000):
        chain = [rng.getrandbits(64) for _ in range(3)]
        firsts.append(chain[0])
        index.apply("a", [BlockStored(chain, root)])
        if step % 3 == 0:  # a third of the sessions leave again
            index.apply("a", [BlockRemoved(chain[::-1])])
    device = index.tiers["device"]
    kids = device._children[root]
    live = [h for h in firsts if device.get(h)]
    assert set(live) <= set(kids) and len(kids) < 2 * len(live) + 8  # dead ones pruned, in bulk
    assert kids.prune_at >= len(kids)  # the next prune waits for growth
    index.apply("a", [BlockRemoved([root])])
    assert device.dirty_mask  # every live child is an orphan of "a" now
    for h in live[:50]:
        assert index.overlap([root, h]) == {}
        assert index.overlap([h]) == {"a": 1}


@settings(max_examples=150, deadline=None)
@given(streams())
def test_multi_event_batches_match_brute_force(stream) -> None:
    """Consecutive events of one worker go in one batch, clears in the middle included."""
    forest, ops = stream
    index = BlockIndex()
    for w in WORKERS:
        index.add_worker(w, 10_000)
    model = {t: {w: set() for w in WORKERS} for t in TIERS}
    runs: list[tuple[str, list]] = []
    for kind, worker, tier, hashes, parent in ops:
        if kind == "readd":
            continue
        if kind == "evict":
            kind, hashes = "remove", held_only(hashes, model[tier][worker])
        if kind == "store":
            event = BlockStored(hashes, parent, tier)
        elif kind == "remove":
            event = BlockRemoved(hashes, tier)
        else:
            event = AllBlocksCleared()
        if runs and runs[-1][0] == worker:
            runs[-1][1].append(event)
        else:
            runs.append((worker, [event]))
        held = model[tier][worker]
        if kind == "store":
            held.update(hashes)
        elif kind == "remove":
            held.difference_update(hashes)
        else:
            for t in TIERS:
                model[t][worker].clear()
    for worker, events in runs:
        assert index.apply(worker, events)
    for node in range(len(forest.parents)):
        chain = forest.chain(node)
        for t in TIERS:
            assert index.overlap(chain, t) == brute_overlap(model[t], chain)
    for w in WORKERS:
        assert index.blocks_of(w) == sum(len(model[t][w]) for t in TIERS)


def test_a_dropped_worker_is_masked_at_once_and_swept_in_slices() -> None:
    index = BlockIndex()
    index.add_worker("a", 1 << 20)
    index.add_worker("b", 1 << 20)
    chain = list(range(1, 1001))
    index.apply("a", [BlockStored(chain)])
    index.apply("b", [BlockStored(chain[:10])])
    index.remove_worker("a")
    assert index.overlap(chain) == {"b": 10}  # gone from answers before any sweep
    assert len(index) == 1000
    index.add_worker("c", 1 << 20)  # a newcomer never inherits a bit still being swept
    assert index.overlap(chain) == {"b": 10}
    assert not index.sweep(budget=400)
    assert not index.sweep(budget=400)
    assert index.sweep(budget=400)
    assert len(index) == 10
    index.apply("b", [AllBlocksCleared(), BlockStored([7])])  # a restart: a fresh bit, old one retired
    assert index.overlap(chain) == {} and index.overlap([7]) == {"b": 1}
    index.sweep_all()
    assert len(index) == 1


class LoopTierIndex(TierIndex):
    """The index before the run paths for shared blocks: blocks nobody holds are stored the run way
    (`_store_fresh`, which overwrites the links of blocks nobody holds), every other store and every
    removal one block at a time."""

    def store(self, bit: int, hashes, parent: int | None) -> int:
        if self._held.keys().isdisjoint(hashes):
            return self._store_fresh(bit, hashes, parent)
        return self._store_loop(bit, hashes, parent)

    def remove(self, bit: int, hashes) -> int:
        return self._remove_loop(bit, list(hashes))


@settings(max_examples=300, deadline=None)
@given(streams())
def test_run_fast_paths_leave_the_state_of_the_block_by_block_loops(stream) -> None:
    """Stores and removals taken in C loops hold the same blocks, mark the same orphans and answer the
    same overlaps as the per-block loops (and a brute-force model)."""
    check_against_the_loops(stream)


@settings(max_examples=300, deadline=None)
@given(streams(tiers=("device",), kinds=("store", "store", "evict")))
def test_leaf_first_evictions_of_shared_chains_match_the_loops(stream) -> None:
    """One tier, no clears: the workers share many blocks, so evictions take the shared-block path,
    with chains of several runs of blocks that others hold and blocks nobody holds after it."""
    check_against_the_loops(stream)


def true_orphans(forest: Forest, held: dict[str, set[int]], index: BlockIndex) -> dict[int, int]:
    """block -> bits of the workers holding it but not its parent."""
    out: dict[int, int] = {}
    for w, blocks in held.items():
        for h in blocks:
            parent = forest.parents[h - 1000]
            if parent is not None and parent + 1000 not in blocks:
                out[h] = out.get(h, 0) | index.bit(w)
    return out


def marks(orphans: dict[int, int]) -> set[tuple[int, int]]:
    return {(h, bit) for h, m in orphans.items() for bit in expand([(m, 0)])}


def masks_of(orphans: dict[int, int]) -> int:
    out = 0
    for m in orphans.values():
        out |= m
    return out


def check_against_the_loops(stream) -> None:
    forest, ops = stream
    fast, loop = BlockIndex(), BlockIndex()
    loop.tiers = {t: LoopTierIndex() for t in TIERS}
    for index in (fast, loop):
        for w in WORKERS:
            index.add_worker(w, 10_000)
    model = {t: {w: set() for w in WORKERS} for t in TIERS}
    for op in ops:
        worker = op[1]
        if op[0] == "readd":
            continue
        event = to_event(op, model)
        assert event is not None
        for index in (fast, loop):
            index.apply(worker, [event])
        for t in TIERS:
            assert fast.tiers[t]._held == loop.tiers[t]._held
            # the same marks as the loops, every block held without its parent among them
            assert fast.tiers[t]._orphans == loop.tiers[t]._orphans
            assert fast.tiers[t].dirty_mask == loop.tiers[t].dirty_mask
            true = true_orphans(forest, model[t], fast)
            assert marks(true) <= marks(fast.tiers[t]._orphans)
            assert masks_of(true) & ~fast.tiers[t].dirty_mask == 0
        for node in range(len(forest.parents)):
            chain = forest.chain(node)
            for t in TIERS:
                assert fast.overlap(chain, t) == loop.overlap(chain, t) == brute_overlap(model[t], chain)
        assert fast.blocks_of(worker) == loop.blocks_of(worker)


def test_an_eviction_of_several_chains_with_runs_others_hold() -> None:
    """One event, two chains leaf first; worker 2 holds a prefix of each and a piece of A's middle
    (orphans), so the blocks gone everywhere come in several runs, one starting inside a chain."""
    a = list(range(100, 110))
    b = list(range(200, 210))
    fast, loop = TierIndex(), LoopTierIndex()
    for tier in (fast, loop):
        tier.store(1, a, None)
        tier.store(1, b, None)
        tier.store(2, a[:3], None)
        tier.store(2, b[:4], None)
        tier.store(2, a[5:7], a[4])  # held without a[4]: orphans of worker 2
        assert tier.remove(1, [*a[:1:-1], *b[:0:-1]]) == 17
        kept = {a[0]: 3, a[1]: 3, a[2]: 2, a[5]: 2, a[6]: 2, b[0]: 3, b[1]: 2, b[2]: 2, b[3]: 2}
        assert tier._held == kept
        assert tier.dirty_mask == 2
        assert expand(tier.prefixes(a)) == {1: 2, 2: 3}
        assert expand(tier.prefixes(b)) == {1: 1, 2: 4}
        tier.store(2, a[3:5], a[2])  # a[4] back: its child a[5] is adopted through the link kept
        assert tier.dirty_mask == 0
        assert expand(tier.prefixes(a)) == {1: 2, 2: 7}
    assert fast._held == loop._held and fast._orphans == loop._orphans


def test_reach_walks_the_device_then_a_lower_tier_moved_or_copied() -> None:
    index = BlockIndex()
    for worker in ("moved", "copied", "device", "gap"):
        index.add_worker(worker, 100)
    chain = [11, 12, 13, 14, 15]
    # kvgate's engines move blocks: the device keeps the head, the host the rest
    index.apply("moved", [BlockStored(chain[:2], None), BlockStored(chain[2:], 12, "host")])
    # vLLM's CPU offloading copies: the host holds the whole chain, the device its head
    index.apply("copied", [BlockStored(chain, None, "host"), BlockStored(chain[:1], None)])
    index.apply("device", [BlockStored(chain[:3], None)])
    index.apply("gap", [BlockStored(chain[:1], None), BlockStored(chain[2:], 12, "host")])
    assert index.reach(chain, "host") == {"moved": 5, "copied": 5, "device": 3, "gap": 1}
    assert index.reach(chain, "disk") == {}  # nothing on disk: no walk
    assert index.overlap(chain) == {"moved": 2, "copied": 1, "device": 3, "gap": 1}
    index.remove_worker("moved")
    assert "moved" not in index.reach(chain, "host")
