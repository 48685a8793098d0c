"""Test helpers: a brute-force replay of KV events, and the block manager's invariants."""

from __future__ import annotations

from collections import Counter

from engines.block_manager import BlockManager
from engines.sequence import Sequence
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent


class ReplayedCache:
    """The cached set a subscriber rebuilds from events alone; a phantom event fails loudly."""

    def __init__(self) -> None:
        self.blocks: dict[int, int | None] = {}  # device tier: hash -> parent
        self.host: dict[int, int | None] = {}  # host tier

    def apply(self, events: list[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                tier = self.blocks if event.tier == "device" else self.host
                parent = event.parent_hash
                for block_hash in event.block_hashes:
                    assert block_hash not in tier, "stored twice without a removal"
                    tier[block_hash] = parent
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                tier = self.blocks if event.tier == "device" else self.host
                for block_hash in event.block_hashes:
                    assert block_hash in tier, "removed a block that was not stored"
                    del tier[block_hash]
            else:
                assert isinstance(event, AllBlocksCleared)
                self.blocks.clear()
                self.host.clear()


def cached_set(bm: BlockManager, tier: str = "device") -> dict[int, int | None]:
    return {b.block_hash: b.parent_hash for b in bm.cached_blocks() if b.tier == tier}


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
    host = bm.host
    if host is not None:
        # tiers are exclusive; every host slot is free, holds a block, or is mid-copy (onboarding)
        assert host.parent_of.keys().isdisjoint(bm._by_hash), "a block cached on two tiers"
        assert host.num_free + len(host) + host.num_claimed == host.num_blocks
        slots = [host.slot_of(h) for h in host.parent_of]
        assert len(set(slots)) == len(slots) and -1 not in slots
        kept = set(host.droppable_in_order()[len(host.droppable_in_order()) - len(host._kept) :])
        assert all(host.is_kept(h) == (h in kept) for h in host.parent_of)
