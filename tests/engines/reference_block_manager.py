"""The block manager as first written, one Python call per block: the reference the fast one in
engines/block_manager.py must match event for event and in its LRU order (test_block_manager.py).

Paged KV blocks with a prefix cache keyed by `router.hashing` chain hashes.

A block is in use (ref count > 0), or free. A free block is either uncached (no hash: never filled,
or a duplicate of a block cached elsewhere) or cached: it keeps its KV and its hash until it is
reused, so a later prompt with the same prefix skips computing it. Allocation takes uncached blocks
first, then evicts cached ones least recently freed first, pinned ones last. Pins (a session's
blocks, with a TTL) are only an eviction order: they never make an allocation fail.

Every change of the cached set is appended to `events` (BlockStored, BlockRemoved, AllBlocksCleared),
in order; the engine drains them after each step. Replaying them reproduces `cached_blocks()`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from engines.sequence import Sequence
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, CachedBlock, KvEvent


class Block:
    __slots__ = ("block_hash", "block_id", "parent_hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.parent_hash: int | None = None


class Pin:
    __slots__ = ("block_hashes", "expires_at")

    def __init__(self, block_hashes: list[int], expires_at: float) -> None:
        self.block_hashes = block_hashes
        self.expires_at = expires_at


class ReferenceBlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        clock: Callable[[], float],
        max_pinned_blocks: int | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.clock = clock
        self.max_pinned_blocks = num_blocks // 2 if max_pinned_blocks is None else max_pinned_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.num_used = 0
        self.events: list[KvEvent] = []
        # free blocks by class; the OrderedDicts are in eviction order (least recently freed first)
        self._uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._pinned_free: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[int, int] = {}
        self._pins: dict[str, Pin] = {}
        self._pin_counts: dict[int, int] = {}
        self.num_pinned = 0
        self._next_expiry = math.inf
        self._removed: list[int] = []  # evictions not yet turned into one BlockRemoved event

    # --- state

    @property
    def num_free(self) -> int:
        return len(self._uncached) + len(self._evictable) + len(self._pinned_free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def cached_blocks(self) -> list[CachedBlock]:
        blocks = self.blocks
        return [CachedBlock(h, blocks[b].parent_hash) for h, b in self._by_hash.items()]

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    @property
    def has_events(self) -> bool:
        return bool(self.events or self._removed)

    def take_events(self) -> list[KvEvent]:
        self._flush_removed()
        events, self.events = self.events, []
        return events

    # --- allocation

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Leading full blocks of `seq` that are cached, keeping at least one token to compute."""
        limit = (len(seq) - 1) // self.block_size
        by_hash = self._by_hash
        hits = 0
        while hits < limit and seq.block_hash(hits) in by_hash:
            hits += 1
        return hits

    def can_allocate(self, seq: Sequence, num_hits: int) -> bool:
        blocks = self.blocks
        by_hash = self._by_hash
        free_hits = sum(1 for i in range(num_hits) if blocks[by_hash[seq.block_hash(i)]].ref_count == 0)
        need = self.blocks_needed(len(seq)) - num_hits
        return self.num_free - free_hits >= need

    def allocate(self, seq: Sequence, num_hits: int) -> None:
        """Give `seq` its cached prefix (`num_hits` blocks) and fresh blocks for the rest of its tokens.
        The caller checked `can_allocate`."""
        table = seq.block_table
        by_hash = self._by_hash
        for i in range(num_hits):
            table.append(self._ref(by_hash[seq.block_hash(i)]))
        for _ in range(self.blocks_needed(len(seq)) - num_hits):
            table.append(self._take_free())
        seq.num_computed_tokens = num_hits * self.block_size
        seq.num_committed_blocks = num_hits
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(seq.block_table)
        return need <= self.num_free

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for `num_tokens` more computed tokens (decode crossing a block boundary)."""
        table = seq.block_table
        for _ in range(self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(table)):
            table.append(self._take_free())

    def commit(self, seq: Sequence) -> None:
        """Offer the blocks `seq` has fully computed to the prefix cache (after a step)."""
        full = seq.num_computed_tokens // self.block_size
        start = seq.num_committed_blocks
        if full <= start:
            return
        seq.num_committed_blocks = full
        by_hash = self._by_hash
        blocks = self.blocks
        run: list[int] = []
        run_parent: int | None = None
        parent = seq.block_hash(start - 1) if start else None
        for i in range(start, full):
            block_hash = seq.block_hash(i)
            if block_hash in by_hash:
                # the same content is cached in another block: this one stays anonymous
                if run:
                    self._stored(run, run_parent)
                    run = []
            else:
                block = blocks[seq.block_table[i]]
                block.block_hash = block_hash
                block.parent_hash = parent
                by_hash[block_hash] = block.block_id
                if not run:
                    run_parent = parent
                run.append(block_hash)
            parent = block_hash
        if run:
            self._stored(run, run_parent)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, tail first, so that a chain's tail is evicted before its head."""
        release = self._release
        for block_id in reversed(seq.block_table):
            release(block_id)
        seq.block_table.clear()
        seq.num_committed_blocks = 0

    def reset(self) -> bool:
        """Drop every cached block; refused (False) while any block is in use."""
        if self.num_used:
            return False
        self._flush_removed()
        for block in self.blocks:
            block.block_hash = None
            block.parent_hash = None
        self._by_hash.clear()
        self._evictable.clear()
        self._pinned_free.clear()
        self._uncached = list(range(self.num_blocks - 1, -1, -1))
        self.events.append(AllBlocksCleared())
        return True

    # --- pins

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float) -> int:
        """Make a session's blocks the last to be evicted for `ttl_s`; returns how many were pinned
        (fewer than asked when the cap on pinned blocks is reached; the prefix is kept)."""
        self.expire_pins()
        self._unpin(session_id)
        room = self.max_pinned_blocks - self.num_pinned
        hashes = list(dict.fromkeys(block_hashes))[: max(room, 0)]
        if ttl_s <= 0 or not hashes:
            return 0
        expires_at = self.clock() + ttl_s
        self._pins[session_id] = Pin(hashes, expires_at)
        self.num_pinned += len(hashes)
        self._next_expiry = min(self._next_expiry, expires_at)
        counts = self._pin_counts
        for block_hash in reversed(hashes):  # tail first: pinned blocks, too, are evicted tail first
            count = counts.get(block_hash, 0)
            counts[block_hash] = count + 1
            if count == 0:
                block_id = self._by_hash.get(block_hash)
                if block_id is not None and block_id in self._evictable:
                    del self._evictable[block_id]
                    self._pinned_free[block_id] = None
        return len(hashes)

    def unpin(self, session_id: str) -> None:
        self._unpin(session_id)

    def expire_pins(self) -> None:
        now = self.clock()
        if now < self._next_expiry:
            return
        expired = [s for s, pin in self._pins.items() if pin.expires_at <= now]
        for session_id in expired:
            self._unpin(session_id)
        self._next_expiry = min((p.expires_at for p in self._pins.values()), default=math.inf)

    def pinned_sessions(self) -> dict[str, list[int]]:
        return {s: list(p.block_hashes) for s, p in self._pins.items()}

    def is_pinned(self, block_hash: int) -> bool:
        return block_hash in self._pin_counts

    def _unpin(self, session_id: str) -> None:
        pin = self._pins.pop(session_id, None)
        if pin is None:
            return
        self.num_pinned -= len(pin.block_hashes)
        counts = self._pin_counts
        for block_hash in reversed(pin.block_hashes):
            count = counts[block_hash] - 1
            if count:
                counts[block_hash] = count
                continue
            del counts[block_hash]
            block_id = self._by_hash.get(block_hash)
            if block_id is not None and block_id in self._pinned_free:
                del self._pinned_free[block_id]
                # as if freed now, tail first (at the front, a shared prefix would go before the
                # blocks of the other sessions on it)
                self._evictable[block_id] = None

    # --- internals

    def _ref(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            if block_id in self._evictable:
                del self._evictable[block_id]
            else:
                del self._pinned_free[block_id]
            self.num_used += 1
        block.ref_count += 1
        return block_id

    def _take_free(self) -> int:
        if self._uncached:
            block_id = self._uncached.pop()
        else:
            self.expire_pins()
            if self._evictable:
                block_id, _ = self._evictable.popitem(last=False)
            elif self._pinned_free:
                block_id, _ = self._pinned_free.popitem(last=False)
            else:
                raise RuntimeError("no free KV block (the scheduler must check first)")
            self._evict(self.blocks[block_id])
        block = self.blocks[block_id]
        block.ref_count = 1
        self.num_used += 1
        return block_id

    def _evict(self, block: Block) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        del self._by_hash[block_hash]
        block.block_hash = None
        block.parent_hash = None
        self._removed.append(block_hash)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count:
            return
        self.num_used -= 1
        if block.block_hash is None:
            self._uncached.append(block_id)
        elif block.block_hash in self._pin_counts:
            self._pinned_free[block_id] = None
        else:
            self._evictable[block_id] = None

    def _stored(self, hashes: list[int], parent: int | None) -> None:
        self._flush_removed()
        self.events.append(BlockStored(hashes, parent))

    def _flush_removed(self) -> None:
        if self._removed:
            self.events.append(BlockRemoved(self._removed))
            self._removed = []
