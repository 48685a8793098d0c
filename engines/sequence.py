"""One request as the engine sees it: its tokens, how many of them have KV computed, and its blocks.

A sequence's tokens are its prompt followed by its output. Every step computes the KV of the next
`n` tokens after `num_computed_tokens`; the step that reaches the last token samples the next one.
So prefill, chunked prefill, decode and recompute after preemption are the same operation.
"""

from __future__ import annotations

import enum

from engines.runner import SamplingParams
from router.hashing import block_hashes


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    __slots__ = (
        "block_hashes",
        "block_size",
        "block_table",
        "finish_reason",
        "hash_seed",
        "num_cached_tokens",
        "num_committed_blocks",
        "num_computed_tokens",
        "num_host_cached_tokens",
        "num_prompt_tokens",
        "priority",
        "ready_at",
        "sampling",
        "seq_id",
        "session_id",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        block_size: int,
        hash_seed: int,
        prompt_block_hashes: list[int],
        session_id: str | None = None,
        *,
        copy_prompt: bool = True,
        priority: int = 0,
    ) -> None:
        """`copy_prompt=False`: `prompt_token_ids` (a list) becomes the sequence's own token list."""
        self.seq_id = seq_id
        adopt = not copy_prompt and type(prompt_token_ids) is list
        self.token_ids = prompt_token_ids if adopt else list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.session_id = session_id
        self.priority = priority  # with priority scheduling (engines/scheduler.py); larger goes first
        self.ready_at = 0.0  # with asynchronous onboarding: when its blocks from the host have landed
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # -1 until first admitted: the prefix hit of the first admission is what the client is told
        self.num_cached_tokens = -1
        self.num_host_cached_tokens = 0  # of which onboarded from the host tier
        self.block_table: list[int] = []
        # chained hashes of the full blocks of token_ids, extended as output fills blocks
        self.block_hashes = prompt_block_hashes
        # leading blocks of block_table already offered to the prefix cache
        self.num_committed_blocks = 0
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def hashes(self, num_blocks: int) -> list[int]:
        """The block hash list, extended to at least `num_blocks` full blocks (hashed in one call)."""
        hashes = self.block_hashes
        have = len(hashes)
        if have < num_blocks:
            size = self.block_size
            parent = hashes[-1] if have else None
            tokens = self.token_ids[have * size : num_blocks * size]
            hashes.extend(block_hashes(tokens, size, self.hash_seed, parent))
            if len(hashes) < num_blocks:
                raise IndexError(f"sequence {self.seq_id!r} has fewer than {num_blocks} full blocks")
        return hashes

    def block_hash(self, index: int) -> int:
        """Hash of full block `index`, computing (and remembering) those not hashed yet."""
        return self.hashes(index + 1)[index]
