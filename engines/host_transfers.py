"""Moves between the device and the host tier, as the block manager decides them.

The block manager owns the device blocks; this class owns the host side of a move: which evicted
blocks the host takes (and what it drops to make room), the host blocks claimed for onboarding, the
copies the engine must run before the step computes (`take_copies`), and the host tier's KV events.
"""

from __future__ import annotations

from collections.abc import Container

import msgspec

from engines.host_tier import HostTier
from router.protocol import BlockRemoved, BlockStored, KvEvent


class BlockCopies(msgspec.Struct):
    """The copies a step must run before it computes: offloads first (device block -> host slot, out of
    blocks about to be reused), then onboards (host slot -> device block)."""

    offloads: list[tuple[int, int]]
    onboards: list[tuple[int, int]]

    def __bool__(self) -> bool:
        return bool(self.offloads or self.onboards)


class HostTransfers:
    def __init__(self, num_blocks: int) -> None:
        self.tier = HostTier(num_blocks)
        self.offloads: list[tuple[int, int]] = []  # (device block, host slot), in order
        self.onboards: list[tuple[int, int]] = []  # (host slot, device block)
        self._removed: list[int] = []  # host drops and claims not yet one BlockRemoved event

    @property
    def has_removed(self) -> bool:
        return bool(self._removed)

    def match(self, block_hashes: list[int]) -> int:
        """How many of `block_hashes`, from the first, are on the host."""
        found = 0
        for block_hash in block_hashes:
            if block_hash not in self.tier:
                break
            found += 1
        return found

    def claim(self, block_hashes: list[int]) -> list[int]:
        """These blocks leave the host to be onboarded; returns their slots."""
        self._removed += block_hashes
        return [self.tier.claim(h) for h in block_hashes]

    def onboarded(self, slots: list[int], block_ids: list[int]) -> None:
        """The claimed `slots` are copied into the device blocks `block_ids` before the next step."""
        self.onboards += zip(slots, block_ids, strict=True)

    def drop_recomputed(self, block_hash: int) -> None:
        """A block computed again (its parent was missing): the device copy replaces the host's."""
        if block_hash in self.tier:
            self.tier.drop(block_hash)
            self._removed.append(block_hash)

    def store_evicted(
        self,
        victims: list[tuple[int, int]],
        parent_of: list[int | None],
        on_device: Container[int],
        events: list[KvEvent],
    ) -> None:
        """Copy the evicted blocks (hash, device block) worth keeping to the host, dropping its oldest
        blocks for room, and append the host's events to `events`. Worth keeping: a chain's first block,
        or one whose parent is cached on either tier (else no prefix match can reach it). When more are
        evicted than the host can take, the last evicted (a chain's head, evicted after its tail) are
        kept. Blocks a session keeps on the host make room only for other such blocks."""
        host = self.tier
        kept = [(h, b) for h, b in victims if self._reachable(parent_of[b], on_device)]
        room = host.num_blocks - host.num_claimed
        if not any(host.is_kept(h) for h, _ in kept):
            room = host.num_free + host.num_droppable  # blocks a session keeps are not pushed out
        kept = kept[len(kept) - room :] if len(kept) > room else kept
        while host.num_free < len(kept):
            self._removed.append(host.drop_oldest())
        self.flush_removed(events)
        for block_hash, block_id in kept:
            self.offloads.append((block_id, host.store(block_hash, parent_of[block_id])))
        # one event per chain run, head first (eviction goes tail first)
        run: list[int] = []
        for block_hash, block_id in reversed(kept):
            parent = parent_of[block_id]
            if run and parent != run[-1]:
                events.append(BlockStored(run, host.parent_of[run[0]], "host"))
                run = []
            run.append(block_hash)
        if run:
            events.append(BlockStored(run, host.parent_of[run[0]], "host"))

    def _reachable(self, parent: int | None, on_device: Container[int]) -> bool:
        return parent is None or parent in on_device or parent in self.tier

    def flush_removed(self, events: list[KvEvent]) -> None:
        if self._removed:
            events.append(BlockRemoved(self._removed, "host"))
            self._removed = []

    def take_copies(self) -> BlockCopies:
        """The copies decided since the last call; the engine runs them before the step's compute."""
        copies = BlockCopies(self.offloads, self.onboards)
        self.offloads, self.onboards = [], []
        self.tier.release_claimed()
        return copies
