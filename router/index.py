"""Which workers hold which blocks, per tier, and how long a prefix of a chain each one holds.

`BlockIndex` is fed the workers' KV events: it maps each worker to a bit, keeps one `TierIndex`
(router/tier_index.py: hash -> worker bitmask, exact prefixes on any event stream) per tier, bounds
each worker's blocks, and answers `overlap` (a tier's matched prefix per worker) and `reach` (the
prefix a worker serves from the device and a lower tier together).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from router.prefix_match import MaskNames
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, CachedBlock, KvEvent, Tier
from router.tier_index import TierIndex


class BlockIndex:
    """The event-fed index: one `TierIndex` per tier, worker ids mapped to bits, bounded per worker.

    Dropping a worker's blocks (it left, restarted or cleared its cache) must not stall the gateway for
    a pass over millions of entries: its bit is retired at once (queries mask it out, and a restarted
    worker continues under a fresh bit), and `sweep` takes retired bits off the entries a slice at a
    time, from `Router.expire`. A retired bit is reused only after a full pass.
    """

    MAX_RETIRED = 64  # beyond this many bits awaiting a sweep, sweep at once (bounds the masks' width)

    def __init__(self) -> None:
        self.tiers: dict[Tier, TierIndex] = {"device": TierIndex(), "host": TierIndex(), "disk": TierIndex()}
        self._bit_of: dict[str, int] = {}
        self._worker_of: dict[int, str] = {}
        self._mask_names = MaskNames(self._worker_of)
        self._count: dict[str, int] = {}  # blocks held, all tiers
        self._limit: dict[str, int] = {}
        self._live = 0  # bits of the current workers
        self._retired = 0  # bits waiting for the next sweep pass
        self._sweeping = 0  # bits of the pass in progress
        self._pass: list[tuple[TierIndex, list[int]]] = []  # (tier, its keys when the pass began)
        self._pos = 0

    def _allocate(self) -> int:
        used = self._live | self._retired | self._sweeping
        bit = 1
        while bit & used:
            bit <<= 1
        return bit

    def add_worker(self, worker_id: str, max_blocks: int) -> int:
        bit = self._bit_of.get(worker_id)
        if bit is None:
            bit = self._allocate()
            self._bit_of[worker_id] = bit
            self._worker_of[bit] = worker_id
            self._live |= bit
            self._mask_names.invalidate()
            self._count[worker_id] = 0
        self._limit[worker_id] = max_blocks
        return bit

    def remove_worker(self, worker_id: str) -> None:
        bit = self._bit_of.pop(worker_id, None)
        if bit is None:
            return
        del self._worker_of[bit]
        self._mask_names.invalidate()
        del self._count[worker_id]
        del self._limit[worker_id]
        self._retire(bit)

    def clear_worker(self, worker_id: str) -> None:
        """Forget the worker's blocks: it continues under a fresh bit, the old one is swept later."""
        bit = self._bit_of.get(worker_id)
        if bit is None or not self._count[worker_id]:
            return
        self._retire(bit)
        new = self._allocate()
        del self._worker_of[bit]
        self._bit_of[worker_id] = new
        self._worker_of[new] = worker_id
        self._live |= new
        self._mask_names.invalidate()
        self._count[worker_id] = 0

    def _retire(self, bit: int) -> None:
        self._live &= ~bit
        self._retired |= bit
        if self._retired.bit_count() + self._sweeping.bit_count() > self.MAX_RETIRED:
            self.sweep_all()

    def sweep(self, budget: int) -> bool:
        """Sweep up to `budget` entries; True when no retired bit is left anywhere."""
        if not self._sweeping:
            if not self._retired:
                return True
            self._sweeping, self._retired = self._retired, 0
            self._pass = [(t, t.keys()) for t in self.tiers.values() if len(t)]
            self._pos = 0
        while budget > 0 and self._pass:
            tier, keys = self._pass[0]
            chunk = keys[self._pos : self._pos + budget]
            tier.sweep(self._sweeping, chunk)
            budget -= len(chunk)
            self._pos += len(chunk)
            if self._pos >= len(keys):
                self._pass.pop(0)
                self._pos = 0
        if self._pass:
            return False
        for tier in self.tiers.values():
            tier.forget_bits(self._sweeping)
        self._sweeping = 0
        return not self._retired

    def sweep_all(self) -> None:
        while not self.sweep(1 << 62):
            pass

    def has_worker(self, worker_id: str) -> bool:
        return worker_id in self._bit_of

    def bit(self, worker_id: str) -> int:
        return self._bit_of[worker_id]

    def worker(self, bit: int) -> str:
        return self._worker_of[bit]

    def blocks_of(self, worker_id: str) -> int:
        """Blocks the worker holds, all tiers (Dynamo's "tree size" tie-breaker)."""
        return self._count.get(worker_id, 0)

    def __len__(self) -> int:
        """Entries: distinct (block, tier) pairs held by a worker (or by a retired bit, until swept)."""
        return sum(len(t) for t in self.tiers.values())

    def apply(self, worker_id: str, events: Iterable[KvEvent]) -> bool:
        """Apply one batch; False when the worker exceeded its bound and was cleared (ask for a dump)."""
        bit = self._bit_of[worker_id]
        tiers = self.tiers
        count = self._count[worker_id]
        for event in events:
            if type(event) is BlockStored:
                count += tiers[event.tier].store(bit, event.block_hashes, event.parent_hash)
            elif type(event) is BlockRemoved:
                count -= tiers[event.tier].remove(bit, event.block_hashes)
            elif type(event) is AllBlocksCleared:
                self._count[worker_id] = count
                self.clear_worker(worker_id)
                bit = self._bit_of[worker_id]
                count = 0
        self._count[worker_id] = count
        if count > self._limit[worker_id]:
            self.clear_worker(worker_id)  # lost removals, or a misbehaving worker: bound the memory
            return False
        return True

    def load_dump(self, worker_id: str, blocks: Iterable[CachedBlock]) -> bool:
        """Replace a worker's blocks with its full list (parents first is best, any order is exact)."""
        self.clear_worker(worker_id)
        bit = self._bit_of[worker_id]
        tiers = self.tiers
        count = 0
        for block in blocks:
            count += tiers[block.tier].store(bit, (block.block_hash,), block.parent_hash)
        self._count[worker_id] = count
        if count > self._limit[worker_id]:
            self.clear_worker(worker_id)
            return False
        return True

    def overlap(
        self, chain: Sequence[int], tier: Tier = "device", hints: Sequence[int] = ()
    ) -> dict[str, int]:
        """Matched prefix length in blocks of every worker holding chain[0] on `tier`; `hints` are
        likely lengths, which only make the answer cheaper to find (`bisect_prefixes`)."""
        return self._mask_names.expand(self.tiers[tier].prefixes(chain, self._live, hints))

    def reach(self, chain: Sequence[int], tier: Tier) -> dict[str, int]:
        """The prefix of `chain` each worker can serve without computing, each block on the device or
        on `tier`: what its engine matches on the device and then onboards from a lower tier. Tiers
        may hold a block once (kvgate's engines move it) or twice (a copy offloaded, as vLLM's CPU
        offloading keeps): either way the prefix is the first block on neither. A linear walk, only
        while the lower tier holds anything."""
        lower = self.tiers[tier]
        reached: dict[str, int] = {}
        if not len(lower) or not chain:
            return reached
        device = self.tiers["device"]
        alive = (device.get(chain[0]) | lower.get(chain[0])) & self._live
        position = 0
        while alive and position < len(chain):
            block_hash = chain[position]
            held = alive & (device.get(block_hash) | lower.get(block_hash))
            self._note_ends(alive & ~held, position, reached)
            alive = held
            position += 1
        self._note_ends(alive, position, reached)
        return reached

    def _note_ends(self, bits: int, length: int, reached: dict[str, int]) -> None:
        while bits:
            bit = bits & -bits
            reached[self._worker_of[bit]] = length
            bits ^= bit
