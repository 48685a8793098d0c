"""The prompt blocks of one worker's requests in flight, as NVIDIA Dynamo's router counts them
(`ActiveSequences`): a block shared by several requests counts once, and leaves when the last of
them completes. `kv_overlap`'s "decode blocks" and `session_kv`'s warm-up cost both read it."""

from __future__ import annotations

from collections.abc import Sequence


class ActiveBlocks:
    __slots__ = ("blocks",)

    def __init__(self) -> None:
        self.blocks: dict[int, int] = {}  # block hash -> in-flight requests holding it

    def __len__(self) -> int:
        """Distinct blocks in flight."""
        return len(self.blocks)

    def add(self, chain: Sequence[int]) -> None:
        blocks = self.blocks
        for h in chain:
            blocks[h] = blocks.get(h, 0) + 1

    def remove(self, chain: Sequence[int]) -> None:
        blocks = self.blocks
        for h in chain:
            n = blocks.get(h, 0)
            if n > 1:
                blocks[h] = n - 1
            else:
                blocks.pop(h, None)

    def potential_blocks(self, chain: Sequence[int]) -> int:
        """Distinct active blocks once `chain` is added."""
        blocks = self.blocks
        return len(blocks) + len(chain) - sum(map(blocks.__contains__, chain))
