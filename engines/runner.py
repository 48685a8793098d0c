"""The contract between the scheduler and a model: what one engine step asks the model to compute.

The scheduler decides which tokens of which sequences run this step and where their KV lives (block
tables from the block manager); a `ModelRunner` computes them. The torch engine and the mock engine
are two runners behind the same scheduler and block manager.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import msgspec


class SamplingParams(msgspec.Struct, frozen=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # a request that continues an answer (the worker's `kvgate.output_token_ids`): its first token is
    # that answer's token number `output_offset`, so sampling per position (a seed) and the mock's text
    # go on as one request's would
    output_offset: int = 0


class ScheduledChunk(msgspec.Struct):
    """One sequence's work in one step.

    `token_ids` are the tokens to compute now, at positions `start_pos .. start_pos+len-1`; positions
    before `start_pos` are already in the KV cache (computed earlier or a prefix-cache hit).
    `block_table` maps logical block i (positions i*B .. i*B+B-1) to a physical block and covers
    every position up to the last one computed now. `sample` is true when the step must produce the
    sequence's next token (last prefill chunk, or decode).
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling: SamplingParams
    output_len: int = 0  # tokens generated so far, to seed sampling per position
    # a runner that never reads token values (`reads_token_ids = False`: the mock) gets an empty
    # `token_ids` and their count here, not a copy of up to a whole step's tokens; -1: len(token_ids)
    num_tokens: int = -1

    def size(self) -> int:
        """Tokens computed now."""
        return self.num_tokens if self.num_tokens >= 0 else len(self.token_ids)


class ModelRunner(Protocol):
    block_size: int
    num_blocks: int
    reads_token_ids: bool  # False: chunks carry `num_tokens` instead of their token values
    # True: `step_time_s` gives each step's modelled duration (the mock), which is the time that counts;
    # False: it gives None and the step's measured wall time counts (a real model)
    models_step_time: bool

    def execute(self, chunks: Sequence[ScheduledChunk]) -> list[int | None]:
        """Compute the chunks (writing their KV into the paged cache) and return, per chunk, the
        sampled next token, or None where `sample` is false."""
        ...

    def step_time_s(self, chunks: Sequence[ScheduledChunk], kv_usage: float) -> float | None:
        """Modelled duration of a step (mock engine); None when the step's real duration counts."""
        ...

    def decode_pass_s(self, context_blocks: int) -> float:
        """A modelled step's decode pass for sequences holding `context_blocks` blocks in all, which
        its outputs leave before (the mock, as Dynamo's mocker sends them); 0 for a real model."""
        ...


@runtime_checkable
class TieredModelRunner(ModelRunner, Protocol):
    """A runner behind an engine with a host tier: it also copies KV blocks between tiers (an engine
    checks for it with `isinstance` when it is given a host tier)."""

    def copy_blocks(self, offloads: list[tuple[int, int]], onboards: list[tuple[int, int]]) -> float | None:
        """Run the step's copies before its compute, in this order: `offloads` (device block, host slot)
        then `onboards` (host slot, device block). Returns their modelled duration (mock), or None when
        their real time counts (it is inside the step's measured time)."""
        ...

    @property
    def host_block_ms(self) -> float:
        """One block's copy from the host onto the device, in ms, as the worker announces it (the
        router prices a host hit at it): modelled (mock), or measured once at startup (torch)."""
        ...

    @property
    def num_layers(self) -> int:
        """The model's layers: a layer-wise onboarding overlaps each layer's copy with the compute of
        the layer before."""
        ...
