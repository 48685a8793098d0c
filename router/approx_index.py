"""Blocks of requests routed to workers that publish no KV events, each expiring after a TTL: the
router's guess at what such a worker holds."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from router.prefix_match import MaskNames, bisect_prefixes


class ApproxIndex:
    """Blocks of requests routed to workers that publish no events, each expiring after a TTL.

    Per worker an LRU of block hashes, touched child-before-parent on every insert, so a parent always
    sits behind its children and eviction (by TTL or by size) keeps each worker's set prefix-closed:
    `overlap` can bisect exactly. Also SGLang's approximate per-worker tree of routed requests.
    """

    def __init__(self, ttl_s: float, max_blocks_per_worker: int) -> None:
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks_per_worker
        self._held: dict[int, int] = {}
        self._lru: dict[str, OrderedDict[int, float]] = {}
        self._bit_of: dict[str, int] = {}
        self._worker_of: dict[int, str] = {}
        self._mask_names = MaskNames(self._worker_of)

    def add_worker(self, worker_id: str) -> None:
        if worker_id in self._bit_of:
            return
        slot = 0
        while (1 << slot) in self._worker_of:
            slot += 1
        self._bit_of[worker_id] = 1 << slot
        self._worker_of[1 << slot] = worker_id
        self._mask_names.invalidate()
        self._lru[worker_id] = OrderedDict()

    def remove_worker(self, worker_id: str) -> None:
        bit = self._bit_of.pop(worker_id, None)
        if bit is None:
            return
        del self._worker_of[bit]
        self._mask_names.invalidate()
        self._drop(bit, list(self._lru.pop(worker_id)))

    def has_worker(self, worker_id: str) -> bool:
        return worker_id in self._bit_of

    def blocks_of(self, worker_id: str) -> int:
        lru = self._lru.get(worker_id)
        return len(lru) if lru is not None else 0

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, block_hash: int) -> bool:
        """Whether any worker's set holds this block."""
        return block_hash in self._held

    def insert(self, worker_id: str, chain: Sequence[int], now: float) -> None:
        lru = self._lru[worker_id]
        bit = self._bit_of[worker_id]
        held = self._held
        expires = now + self.ttl_s
        for h in reversed(chain):
            if h in lru:
                lru.move_to_end(h)
            else:
                held[h] = held.get(h, 0) | bit
            lru[h] = expires
        excess = len(lru) - self.max_blocks
        if excess > 0:
            self._drop(bit, [lru.popitem(last=False)[0] for _ in range(excess)])

    def expire(self, now: float) -> None:
        for worker_id, lru in self._lru.items():
            gone = []
            for h, expires in lru.items():
                if expires > now:
                    break
                gone.append(h)
            for h in gone:
                del lru[h]
            if gone:
                self._drop(self._bit_of[worker_id], gone)

    def overlap(self, chain: Sequence[int]) -> dict[str, int]:
        groups: list[tuple[int, int]] = []
        bisect_prefixes(self._held.get, chain, -1, groups)
        return self._mask_names.expand(groups)

    def _drop(self, bit: int, hashes: Iterable[int]) -> None:
        held = self._held
        for h in hashes:
            m = held.get(h, 0) & ~bit
            if m:
                held[h] = m
            else:
                held.pop(h, None)
