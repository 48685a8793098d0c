"""One tier's index alone: its fast paths (bisection, runs) and its orphan bookkeeping, by example.

tests/router/test_index.py checks it, through `BlockIndex`, against a brute-force model on random
event streams.
"""

from __future__ import annotations

import random

from router.prefix_match import expand, walk_prefixes
from router.tier_index import TierIndex


def test_eviction_leaf_first_keeps_workers_on_the_fast_path() -> None:
    tier = TierIndex()
    chain = list(range(100, 164))
    tier.store(1, chain, None)
    tier.store(2, chain[:10], None)
    tier.remove(1, reversed(chain[40:]))  # engines evict a chain from its tail
    assert tier.dirty_mask == 0
    assert expand(tier.prefixes(chain)) == {1: 40, 2: 10}


def test_a_parent_evicted_first_is_answered_exactly_by_the_slow_path() -> None:
    tier = TierIndex()
    chain = list(range(100, 164))
    tier.store(1, chain, None)
    tier.remove(1, [chain[5]])
    assert tier.dirty_mask == 1
    assert expand(tier.prefixes(chain)) == {1: 5}
    tier.store(1, [chain[5]], chain[4])  # the parent comes back: the chain is whole again
    assert tier.dirty_mask == 0
    assert expand(tier.prefixes(chain)) == {1: 64}


def test_bisection_agrees_with_the_walk_on_prefix_closed_sets() -> None:
    rng = random.Random(7)
    chain = [rng.getrandbits(64) for _ in range(2048)]
    tier = TierIndex()
    lengths = {1 << i: rng.randrange(0, 2049) for i in range(64)}
    for bit, n in lengths.items():
        tier.store(bit, chain[:n], None)
    slow: list[tuple[int, int]] = []
    walk_prefixes(tier._held.get, chain, (1 << 64) - 1, slow)
    assert expand(tier.prefixes(chain)) == expand(slow) == {bit: n for bit, n in lengths.items() if n}


def test_shared_blocks_stored_and_evicted_as_runs() -> None:
    tier = TierIndex()
    chain = list(range(100, 164))
    tier.store(1, chain, None)
    assert tier.store(2, chain[:40], None) == 40  # all shared with worker 1: the run path
    tier.store(2, [900, 901], chain[39])  # a branch of worker 2 off the shared prefix
    assert expand(tier.prefixes([*chain[:40], 900, 901])) == {1: 40, 2: 42}
    assert tier.remove(1, chain[63:19:-1]) == 44  # tail first, half of it shared: the run path
    assert tier.dirty_mask == 0
    assert expand(tier.prefixes(chain)) == {1: 20, 2: 40}
    assert tier.remove(2, [chain[10]]) == 1  # a shared parent leaves worker 2 before its children
    assert tier.dirty_mask == 2
    assert expand(tier.prefixes([*chain[:40], 900])) == {1: 20, 2: 10}
    assert tier.store(2, [chain[10]], chain[9]) == 1  # back: its children are adopted again
    assert tier.dirty_mask == 0
    assert expand(tier.prefixes([*chain[:40], 900])) == {1: 20, 2: 41}


def test_a_child_adopted_by_a_fresh_store_keeps_its_link() -> None:
    """Y's children Z and W: Z arrives first (an orphan), then Y with W in one store of blocks
    nobody held. Y's link to Z must survive it, so that Y leaving marks Z again."""
    x, y, z, w = 10, 11, 12, 13
    tier = TierIndex()
    tier.store(1, [x], None)
    tier.store(1, [z], y)
    tier.store(1, [y, w], x)
    assert tier.dirty_mask == 0
    tier.remove(1, [w, y])  # leaf first
    assert tier.dirty_mask == 1  # z is held without y
    assert expand(tier.prefixes([x, y, z])) == {1: 1}
