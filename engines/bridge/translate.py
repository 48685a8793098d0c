"""Engine events to kvgate's: every stored block re-hashed from its `token_ids` with `router.hashing`
(the hash the gateway computes from prompts), and a map engine hash -> our hash to translate removals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from engines.bridge.wire import (
    EngineCleared,
    EngineEvent,
    EngineHash,
    EngineRemoved,
    EngineStored,
    medium_tier,
    normalise_hash,
)
from router.hashing import block_hashes, hash_seed
from router.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlock,
    KvEvent,
    Tier,
)

log = logging.getLogger(__name__)

# Far above any engine's block count: reaching it means removals went missing, so start over.
MAX_TRACKED_BLOCKS = 8_000_000


class _Block:
    """One engine block: our hashes of its tokens (several when the engine's blocks are a multiple of
    ours, as LMCache's 256-token chunks are), the parent of the first, and where it is held."""

    __slots__ = ("ours", "parent", "seed", "tiers", "whole")

    def __init__(self, ours: list[int], parent: int | None, seed: int, whole: bool = True) -> None:
        self.ours = ours
        self.parent = parent
        self.seed = seed
        self.whole = whole  # False: a chunk's tokens end mid-block (LMCache's last), so no child follows
        # stores not yet removed, per tier: an engine may announce one hash twice (vLLM caches a
        # block computed twice in two slots; its offloading connector re-announces shared hashes per
        # chunk) and removes it as often, so the block leaves a tier with its last removal
        self.tiers: dict[Tier, int] = {}

    @property
    def our_hash(self) -> int:
        """The last of our hashes: what a child block chains on."""
        return self.ours[-1]


class EventTranslator:
    """Engine events -> our events, keeping engine hash -> our hash for every block the engine holds.

    Only KV cache group 0 is followed (a hybrid model's other groups describe the same tokens).
    A stored block whose parent the bridge never saw cannot be re-hashed (its prefix is unknown) and
    is skipped; so are blocks of a size that is not a multiple of ours, which would never match a
    prompt. A block of k times our size (LMCache's chunks) is k of ours; one event's single block of
    another size (LMCache's last chunk of a prompt) is its whole blocks of ours.

    Each event's `medium` names its tier (`wire.MEDIUM_TIERS`). A store without token ids (vLLM's
    offloading connector announcing a CPU copy by hash) adds the tier to a block the bridge knows by
    that hash, and is skipped otherwise. Events of a medium that is no tier of ours, or of a block
    held by another node (vLLM's `locality` "REMOTE"), are left out and counted in `unplaced_blocks`.
    """

    def __init__(self, block_size: int, max_blocks: int = MAX_TRACKED_BLOCKS) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._blocks: dict[EngineHash, _Block] = {}
        self.skipped_blocks = 0
        self.size_mismatches = 0
        self.unplaced_blocks = 0
        self._unplaced_media: set[str] = set()  # logged once each (bounded)

    def __len__(self) -> int:
        return len(self._blocks)

    def our_hash(self, engine_hash: EngineHash) -> int | None:
        block = self._blocks.get(normalise_hash(engine_hash))
        return None if block is None else block.our_hash

    def translate(self, events: Iterable[EngineEvent]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for event in events:
            if isinstance(event, EngineCleared):
                out.extend(self.clear())
            elif event.group_idx not in (None, 0):
                continue
            elif isinstance(event, EngineStored):
                out.extend(self._stored(event))
            else:
                out.extend(self._removed(event))
        return out

    def clear(self) -> list[KvEvent]:
        self._blocks.clear()
        return [AllBlocksCleared()]

    def cached_blocks(self) -> list[CachedBlock]:
        out: list[CachedBlock] = []
        for block in self._blocks.values():
            for tier in sorted(block.tiers):
                parent = block.parent
                for our in block.ours:
                    out.append(CachedBlock(our, parent, tier))
                    parent = our
        return out

    def _tier(self, event: EngineStored | EngineRemoved) -> Tier | None:
        tier = None if event.remote else medium_tier(event.medium)
        if tier is None:
            self.unplaced_blocks += len(event.block_hashes)
            name = "REMOTE" if event.remote else str(event.medium)
            if name not in self._unplaced_media and len(self._unplaced_media) < 16:
                self._unplaced_media.add(name)
                log.warning("engine events of medium %r are no tier of this worker: left out", name)
        return tier

    def _stored(self, event: EngineStored) -> Iterator[KvEvent]:
        tier = self._tier(event)
        if tier is None:
            return
        if not event.token_ids:
            yield from self._stored_by_hash(event.block_hashes, tier)
            return
        count = len(event.block_hashes)
        per, rest = divmod(event.block_size, self.block_size)
        if rest and count == 1 and per:  # one chunk ending mid-block: its whole blocks of ours
            rest = 0
        if not per or rest:
            self._size_mismatch(event, count)
            return
        parent: int | None = None
        seed = hash_seed(event.lora_name)
        if event.parent is not None:
            known = self._blocks.get(event.parent)
            if known is None or not known.whole:
                self.skipped_blocks += count
                return
            parent, seed = known.our_hash, known.seed
        ours = block_hashes(event.token_ids, self.block_size, seed, parent)
        whole = event.block_size % self.block_size == 0
        first_parent = parent
        for i, engine_hash in enumerate(event.block_hashes):
            block = self._blocks.get(engine_hash)
            if block is None:
                if len(self._blocks) >= self.max_blocks:
                    log.error("tracking %d blocks: removals must have been lost; clearing", len(self._blocks))
                    yield from self.clear()
                    return
                block = self._blocks[engine_hash] = _Block(ours[i * per : (i + 1) * per], parent, seed, whole)
            block.tiers[tier] = block.tiers.get(tier, 0) + 1
            parent = block.our_hash
        yield BlockStored(ours, first_parent, tier)

    def _size_mismatch(self, event: EngineStored, count: int) -> None:
        self.skipped_blocks += count
        parent = None if event.parent is None else self._blocks.get(event.parent)
        if count == 1 and parent is not None and len(parent.ours) > 1:
            return  # a chunk engine's last chunk, shorter than one of our blocks: nothing to match
        self.size_mismatches += 1
        engine_size = event.block_size
        if self.size_mismatches == 1:
            log.error(
                "engine block size %d is not a multiple of the bridge's block size %d: its blocks cannot"
                " match any prompt; start the bridge with --block-size %d",
                engine_size, self.block_size, engine_size,
            )  # fmt: skip

    def _stored_by_hash(self, engine_hashes: list[EngineHash], tier: Tier) -> Iterator[KvEvent]:
        """A copy of blocks announced before, named by their engine hashes only: one store per run
        of blocks that chain (an offload moves a prefix, parent first)."""
        run: list[int] = []
        run_parent: int | None = None
        for engine_hash in engine_hashes:
            block = self._blocks.get(engine_hash)
            if block is None:
                self.skipped_blocks += 1  # a copy of a block we never placed: nothing to re-hash
                continue
            block.tiers[tier] = block.tiers.get(tier, 0) + 1
            if run and block.parent != run[-1]:
                yield BlockStored(run, run_parent, tier)
                run = []
            if not run:
                run_parent = block.parent
            run.extend(block.ours)
        if run:
            yield BlockStored(run, run_parent, tier)

    def _removed(self, event: EngineRemoved) -> Iterator[KvEvent]:
        tier = self._tier(event)
        if tier is None:
            return
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            block = self._blocks.get(engine_hash)
            held = 0 if block is None else block.tiers.get(tier, 0)
            if block is None or not held:
                continue  # a block we skipped, or a duplicate removal
            if held > 1:
                block.tiers[tier] = held - 1  # still stored there under another announcement
                continue
            del block.tiers[tier]
            if not block.tiers:
                del self._blocks[engine_hash]
            gone.extend(block.ours)
        if gone:
            yield BlockRemoved(gone, tier)
