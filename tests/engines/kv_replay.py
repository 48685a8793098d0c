"""Test helpers: a brute-force replay of KV events, and the block manager's invariants."""

from __future__ import annotations

from collections import Counter

from engines.block_manager import BlockManager
from engines.sequence import Sequence
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent


class ReplayedCache:
    """The cached set a subscriber rebuilds from events alone; a phantom event fails loudly."""

    def __init__(self) -> None:
        self.blocks: dict[int, int | None] = {}  # hash -> parent

    def apply(self, events: list[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                parent = event.parent_hash
                for block_hash in event.block_hashes:
                    assert block_hash not in self.blocks, "stored twice without a removal"
                    self.blocks[block_hash] = parent
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    assert block_hash in self.blocks, "removed a block that was not stored"
                    del self.blocks[block_hash]
            else:
                assert isinstance(event, AllBlocksCleared)
                self.blocks.clear()


def cached_set(bm: BlockManager) -> dict[int, int | None]:
    return {b.block_hash: b.parent_hash for b in bm.cached_blocks()}


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = Counter(block_id for seq in live for block_id in seq.block_table)
    free: list[int] = list(bm._uncached) + list(bm._evictable) + list(bm._pinned_free)
    assert len(free) == len(set(free)), "a block is free twice"
    assert set(free).isdisjoint(refs), "a block in use is also free"
    assert len(free) + len(refs) == bm.num_blocks, "a block is neither free nor in use"
    assert bm.num_used == len(refs)
    for block_id in range(bm.num_blocks):
        assert bm.ref_counts[block_id] == refs.get(block_id, 0)
        block_hash = bm.block_hash_of[block_id]
        if block_hash is not None:
            assert bm._by_hash[block_hash] == block_id
        else:
            assert bm.parent_of[block_id] is None
    assert len(bm._by_hash) == sum(1 for h in bm.block_hash_of if h is not None)
    assert all(bm.block_hash_of[b] is None for b in bm._uncached)
    assert all(not bm.is_pinned(bm.block_hash_of[b]) for b in bm._evictable)
    assert all(bm.is_pinned(bm.block_hash_of[b]) for b in bm._pinned_free)
    pins = bm.pinned_sessions()
    assert bm.num_pinned == sum(len(h) for h in pins.values()) <= bm.max_pinned_blocks
    assert Counter(h for hashes in pins.values() for h in hashes) == Counter(bm._pin_counts)
    for seq in live:
        # a running sequence holds a block for every token it has computed or will compute now
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
