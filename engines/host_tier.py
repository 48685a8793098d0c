"""The host tier: copies of KV blocks in host memory, behind the device's paged cache.

A block the device evicts is offloaded here (when it can still be matched: its parent is cached on
either tier), a prefix found here is onboarded (copied back) instead of recomputed, and a block here
is dropped when the tier needs room: least recently offloaded first, those a session asked to keep
("keep on host at least", a weaker pin) last. Tiers are exclusive: a block leaves this tier when it is
onboarded, so no hash is cached on both (between the decision and the copy it is on neither).

Each block has a slot (its place in a host buffer: the torch runner copies into it). A slot whose
block is being onboarded stays taken until the engine has run the step's copies (`release_claimed`),
so that no offload of the same step overwrites it first. This class only keeps the state; the block
manager and engines/host_transfers.py decide, and turn every change into a KV event.
"""

from __future__ import annotations

import math
from collections import OrderedDict

# Keeps come from the bus (a gateway's hints, one per session at its tool call): together they list at
# most this many hashes per host block, so that a flood of sessions costs bounded memory. Four sessions
# can keep every block of the tier (shared prefixes are listed once per keep); past that, the oldest
# keeps end first, as the newest sessions are the ones coming back.
KEPT_HASHES_PER_BLOCK = 4


class HostKeep:
    __slots__ = ("block_hashes", "expires_at")

    def __init__(self, block_hashes: list[int], expires_at: float) -> None:
        self.block_hashes = block_hashes
        self.expires_at = expires_at


class HostTier:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the host tier needs at least one block")
        self.num_blocks = num_blocks
        self._free_slots: list[int] = list(range(num_blocks - 1, -1, -1))
        self._claimed: list[int] = []  # slots of blocks being onboarded this step
        # the blocks held, in drop order (least recently offloaded first): hash -> slot
        self._droppable: OrderedDict[int, int] = OrderedDict()
        self._kept: OrderedDict[int, int] = OrderedDict()  # held by a keep: dropped last
        self.parent_of: dict[int, int | None] = {}
        self._keeps: dict[str, HostKeep] = {}  # in the order given (a replaced keep is given anew)
        self._keep_counts: dict[int, int] = {}
        self.max_kept_hashes = KEPT_HASHES_PER_BLOCK * num_blocks
        self._kept_hashes = 0  # listed by every keep together
        self._next_expiry = math.inf

    # --- state

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.parent_of

    def __len__(self) -> int:
        return len(self.parent_of)

    @property
    def num_free(self) -> int:
        return len(self._free_slots)

    @property
    def num_droppable(self) -> int:
        """Blocks no keep holds."""
        return len(self._droppable)

    @property
    def num_claimed(self) -> int:
        return len(self._claimed)

    def slot_of(self, block_hash: int) -> int:
        return self._droppable.get(block_hash, self._kept.get(block_hash, -1))

    def droppable_in_order(self) -> list[int]:
        """Hashes in the order `drop_oldest` would take them."""
        return [*self._droppable, *self._kept]

    def is_kept(self, block_hash: int) -> bool:
        return block_hash in self._keep_counts

    # --- changes

    def store(self, block_hash: int, parent_hash: int | None) -> int:
        """Hold a block offloaded from the device; returns its slot. The caller made room."""
        slot = self._free_slots.pop()
        self.parent_of[block_hash] = parent_hash
        if block_hash in self._keep_counts:
            self._kept[block_hash] = slot
        else:
            self._droppable[block_hash] = slot
        return slot

    def claim(self, block_hash: int) -> int:
        """The block leaves the tier to be onboarded; returns its slot, taken until the copy ran."""
        slot = self._droppable.pop(block_hash, None)
        if slot is None:
            slot = self._kept.pop(block_hash)
        del self.parent_of[block_hash]
        self._claimed.append(slot)
        return slot

    def drop(self, block_hash: int) -> None:
        slot = self._droppable.pop(block_hash, None)
        if slot is None:
            slot = self._kept.pop(block_hash)
        del self.parent_of[block_hash]
        self._free_slots.append(slot)

    def drop_oldest(self) -> int:
        """Drop the block first in drop order; returns its hash."""
        order = self._droppable or self._kept
        block_hash, slot = order.popitem(last=False)
        del self.parent_of[block_hash]
        self._free_slots.append(slot)
        return block_hash

    def release_claimed(self) -> None:
        """The step's onboarding copies ran: their slots are free again."""
        self._free_slots.extend(self._claimed)
        self._claimed.clear()

    def clear(self) -> list[int]:
        """Drop every block; returns their hashes."""
        hashes = list(self.parent_of)
        for slot in [*self._droppable.values(), *self._kept.values()]:
            self._free_slots.append(slot)
        self._droppable.clear()
        self._kept.clear()
        self.parent_of.clear()
        return hashes

    # --- keeps

    def keep(self, session_id: str, block_hashes: list[int], expires_at: float) -> None:
        """Drop a session's blocks last until `expires_at`, wherever they are when they reach the host
        (replaces the session's previous keep). Past `max_kept_hashes`, the oldest keeps end (a keep
        longer than that alone keeps its first blocks)."""
        self.unkeep(session_id)
        hashes = list(dict.fromkeys(block_hashes))[: self.max_kept_hashes]
        if not hashes:
            return
        while self._kept_hashes + len(hashes) > self.max_kept_hashes:
            self.unkeep(next(iter(self._keeps)))
        self._keeps[session_id] = HostKeep(hashes, expires_at)
        self._kept_hashes += len(hashes)
        self._next_expiry = min(self._next_expiry, expires_at)
        counts = self._keep_counts
        for block_hash in hashes:
            counts[block_hash] = counts.get(block_hash, 0) + 1
            if block_hash in self._droppable:
                self._kept[block_hash] = self._droppable.pop(block_hash)

    def unkeep(self, session_id: str) -> None:
        keep = self._keeps.pop(session_id, None)
        if keep is None:
            return
        self._kept_hashes -= len(keep.block_hashes)
        counts = self._keep_counts
        for block_hash in keep.block_hashes:
            count = counts.pop(block_hash) - 1
            if count:
                counts[block_hash] = count
            elif block_hash in self._kept:
                self._droppable[block_hash] = self._kept.pop(block_hash)

    def expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        for session_id in [s for s, k in self._keeps.items() if k.expires_at <= now]:
            self.unkeep(session_id)
        self._next_expiry = min((k.expires_at for k in self._keeps.values()), default=math.inf)

    def kept_sessions(self) -> dict[str, list[int]]:
        return {s: list(k.block_hashes) for s, k in self._keeps.items()}
