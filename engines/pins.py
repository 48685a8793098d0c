"""Session pins: a session's blocks, for a TTL, are the last the device evicts.

A pin is only an eviction order: it never makes an allocation fail. The block manager keeps its free
cached blocks in two orders, evictable and pinned (each least recently freed first); this class
counts the pins on each hash and moves a free block from one order to the other when its first pin
comes or its last one goes. The block manager reads `counts` to file a block it frees.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable


class Pin:
    __slots__ = ("block_hashes", "expires_at")

    def __init__(self, block_hashes: list[int], expires_at: float) -> None:
        self.block_hashes = block_hashes
        self.expires_at = expires_at


class SessionPins:
    def __init__(
        self,
        max_pinned_blocks: int,
        clock: Callable[[], float],
        evictable: OrderedDict[int, int],
        pinned_free: OrderedDict[int, int],
    ) -> None:
        self.max_pinned_blocks = max_pinned_blocks
        self.clock = clock
        # the block manager's free cached blocks (hash -> block id): the same objects, never replaced
        self._evictable = evictable
        self._pinned_free = pinned_free
        self._pins: dict[str, Pin] = {}
        self.counts: dict[int, int] = {}  # hash -> pins holding it
        self.num_pinned = 0
        self._next_expiry = math.inf

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.counts

    def sessions(self) -> dict[str, list[int]]:
        return {s: list(p.block_hashes) for s, p in self._pins.items()}

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float) -> int:
        """Make a session's blocks the last to be evicted for `ttl_s`; returns how many were pinned
        (fewer than asked when the cap on pinned blocks is reached; the prefix is kept)."""
        self.expire(self.clock())
        old = self._pins.get(session_id)
        if old is not None and ttl_s > 0:
            common = self._grown_from(old, block_hashes)
            if common is not None:
                return self._pin_grown(session_id, old, common, block_hashes[common:], ttl_s)
        self.unpin(session_id)
        room = self.max_pinned_blocks - self.num_pinned
        hashes = list(dict.fromkeys(block_hashes))[: max(room, 0)]
        if ttl_s <= 0 or not hashes:
            return 0
        expires_at = self.clock() + ttl_s
        self._pins[session_id] = Pin(hashes, expires_at)
        self.num_pinned += len(hashes)
        self._next_expiry = min(self._next_expiry, expires_at)
        self._count(hashes)
        return len(hashes)

    def unpin(self, session_id: str) -> None:
        pin = self._pins.pop(session_id, None)
        if pin is not None:
            self.num_pinned -= len(pin.block_hashes)
            self._uncount(pin.block_hashes)

    def expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        expired = [s for s, pin in self._pins.items() if pin.expires_at <= now]
        for session_id in expired:
            self.unpin(session_id)
        self._next_expiry = min((p.expires_at for p in self._pins.values()), default=math.inf)

    def _grown_from(self, old: Pin, block_hashes: list[int]) -> int | None:
        """The usual re-pin, after a turn: the session's chain grew from some block of its old pin on
        (its last blocks may differ: a trace's partial last block, an edited turn). Returns how many
        leading blocks the pins share when the new part is distinct, held by no pin and within the
        cap; else None."""
        old_hashes = old.block_hashes
        common = 0
        for mine, theirs in zip(old_hashes, block_hashes, strict=False):
            if mine != theirs:
                break
            common += 1
        tail = block_hashes[common:]
        grown_by = len(tail) - (len(old_hashes) - common)
        if (
            not block_hashes
            or self.num_pinned + grown_by > self.max_pinned_blocks
            or len(set(tail)) != len(tail)
            or any(h in self.counts for h in tail)
        ):
            return None
        return common

    def _pin_grown(self, session_id: str, old: Pin, common: int, tail: list[int], ttl_s: float) -> int:
        """`pin`'s end state for a grown chain without uncounting and recounting the blocks the old and
        new pins share (a session's re-pin was ~12 % of a simulator replay). The old blocks past
        `common` leave the pin, as `unpin` does; the new blocks' free ones, then the shared blocks'
        free ones this pin alone holds, move to the end of the pinned order, each tail first."""
        counts = self.counts
        self._uncount(old.block_hashes[common:])
        shared = old.block_hashes[:common]
        sole_free = [h for h in reversed(shared) if counts[h] == 1 and h in self._pinned_free]
        self._count(tail)
        for block_hash in sole_free:
            self._pinned_free.move_to_end(block_hash)
        self.num_pinned += len(tail) - (len(old.block_hashes) - common)
        old.block_hashes = shared + tail
        old.expires_at = self.clock() + ttl_s
        self._pins[session_id] = self._pins.pop(session_id)  # as a new pin: last in expiry order
        self._next_expiry = min(self._next_expiry, old.expires_at)
        return len(old.block_hashes)

    def _count(self, hashes: list[int]) -> None:
        """One pin more on each of `hashes` (distinct), tail first: a free block that gains its first
        pin moves to the end of the pinned order, so that pinned blocks, too, are evicted tail first."""
        counts, evictable, pinned_free = self.counts, self._evictable, self._pinned_free
        for block_hash in reversed(hashes):
            count = counts.get(block_hash, 0)
            counts[block_hash] = count + 1
            if count == 0 and block_hash in evictable:
                pinned_free[block_hash] = evictable.pop(block_hash)

    def _uncount(self, hashes: list[int]) -> None:
        """One pin less on each of `hashes`, tail first. A free block no pin holds any more rejoins the
        evictable order as if freed now (at its front, a shared prefix would go before the blocks of
        the other sessions on it)."""
        counts = self.counts
        pinned_free = self._pinned_free
        for block_hash in reversed(hashes):
            count = counts.pop(block_hash) - 1
            if count:
                counts[block_hash] = count
            elif block_hash in pinned_free:
                self._evictable[block_hash] = pinned_free.pop(block_hash)
