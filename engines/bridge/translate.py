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
    __slots__ = ("our_hash", "parent", "seed", "tiers")

    def __init__(self, our_hash: int, parent: int | None, seed: int) -> None:
        self.our_hash = our_hash
        self.parent = parent
        self.seed = seed
        self.tiers: set[Tier] = set()


class EventTranslator:
    """Engine events -> our events, keeping engine hash -> our hash for every block the engine holds.

    Only KV cache group 0 is followed (a hybrid model's other groups describe the same tokens).
    A stored block whose parent the bridge never saw cannot be re-hashed (its prefix is unknown) and
    is skipped; so are blocks of a different size than ours, which would never match a prompt.
    """

    def __init__(self, block_size: int, max_blocks: int = MAX_TRACKED_BLOCKS) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._blocks: dict[EngineHash, _Block] = {}
        self.skipped_blocks = 0
        self.size_mismatches = 0

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
        return [
            CachedBlock(b.our_hash, b.parent, tier) for b in self._blocks.values() for tier in sorted(b.tiers)
        ]

    def _stored(self, event: EngineStored) -> Iterator[KvEvent]:
        if event.block_size != self.block_size:
            self.size_mismatches += 1
            self.skipped_blocks += len(event.block_hashes)
            if self.size_mismatches == 1:
                log.error(
                    "engine block size %d != bridge block size %d: its blocks cannot match any prompt;"
                    " start the bridge with --block-size %d",
                    event.block_size, self.block_size, event.block_size,
                )  # fmt: skip
            return
        count = len(event.block_hashes)
        parent: int | None = None
        seed = hash_seed(event.lora_name)
        if event.parent is not None:
            known = self._blocks.get(event.parent)
            if known is None:
                self.skipped_blocks += count
                return
            parent, seed = known.our_hash, known.seed
        tier = medium_tier(event.medium)
        ours = block_hashes(event.token_ids, self.block_size, seed, parent)
        first_parent = parent
        for engine_hash, our in zip(event.block_hashes, ours, strict=True):
            block = self._blocks.get(engine_hash)
            if block is None:
                if len(self._blocks) >= self.max_blocks:
                    log.error("tracking %d blocks: removals must have been lost; clearing", len(self._blocks))
                    yield from self.clear()
                    return
                block = self._blocks[engine_hash] = _Block(our, parent, seed)
            block.tiers.add(tier)
            parent = our
        yield BlockStored(ours, first_parent, tier)

    def _removed(self, event: EngineRemoved) -> Iterator[KvEvent]:
        tier = medium_tier(event.medium)
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            block = self._blocks.get(engine_hash)
            if block is None or tier not in block.tiers:
                continue  # a block we skipped, or a duplicate removal
            block.tiers.discard(tier)
            if not block.tiers:
                del self._blocks[engine_hash]
            gone.append(block.our_hash)
        if gone:
            yield BlockRemoved(gone, tier)
