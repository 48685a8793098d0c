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
    free: list[int] = list(bm._uncached) + list(bm._evictable.values()) + list(bm._pinned_free.values())
    assert len(free) == len(set(free)), "a block is free twice"
    assert set(free).isdisjoint(refs), "a block in use is also free"
    assert len(free) + len(refs) == bm.num_blocks, "a block is neither free nor in use"
    assert bm.num_used == len(refs)
    hash_of = {block_id: block_hash for block_hash, block_id in bm._by_hash.items()}
    assert len(hash_of) == len(bm._by_hash), "two hashes cached in one block"
    for block_id in range(bm.num_blocks):
        assert bm.ref_counts[block_id] == refs.get(block_id, 0)
    assert all(b not in hash_of for b in bm._uncached)
    # the free orders are keyed by the hashes of their blocks
    assert all(hash_of.get(b) == h and not bm.is_pinned(h) for h, b in bm._evictable.items())
    assert all(hash_of.get(b) == h and bm.is_pinned(h) for h, b in bm._pinned_free.items())
    for seq in live:
        # a committed block holds its chain hash, unless it stayed uncached (its content was cached in
        # another block already)
        committed = seq.num_committed_blocks
        chain = zip(seq.block_table[:committed], seq.block_hashes[:committed], strict=True)
        for block_id, block_hash in chain:
            assert hash_of.get(block_id, block_hash) == block_hash
            assert block_id in hash_of or bm._by_hash.get(block_hash) != block_id
    assert bm.hash_of == [hash_of.get(b) for b in range(bm.num_blocks)]
    pins = bm.pinned_sessions()
    assert bm.num_pinned == sum(len(h) for h in pins.values()) <= bm.max_pinned_blocks
    assert Counter(h for hashes in pins.values() for h in hashes) == Counter(bm._pin_counts)
    for seq in live:
        # a running sequence holds a block for every token it has computed or will compute now
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
