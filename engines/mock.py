"""A model runner that computes nothing and takes the time the Dynamo mocker says a GPU would.

Prefill ms = 4.209989e-7·t² + 1.518344e-2·t + 16.50142 for the t new tokens in the batch; decode ms
per step = max(1, -25.74·p² + 54.01·p + 5.74) at KV usage p (`lib/mocker/src/common/perf_model.rs`).
A step with both pays both. A step that samples a token pays the decode time, the step that ends a
prompt's prefill included: Dynamo's mocker decodes a request's first token in the pass that computed
its last prompt chunk and charges that pass the decode time. `speedup` divides the modelled time.

A step's outputs leave after its prefill time, before its decode time (`decode_pass_s`), as Dynamo
1.6.1's mocker sends them: each pass sleeps the prefill of its prompt chunks, sends a token for every
sequence then decoding (a prompt finished in this pass included), and then sleeps the decode time of
those still decoding, none where all of them finished (the engine times that: `Engine._decode_pass`).
So a prompt's first token comes at the end of its last prefill chunk and each later token one pass
after the one before. Measured through its frontend, one worker alone: a cached prompt of 30k tokens
with 22 new ones gives its first token in 24.8 ms and its second 25.2 ms later (the decode time at p =
0.46 is 25.1 ms), and the same request sent again as soon as the answer came is as fast (no decode
pass after the last token); sending after the whole pass gave 45.1 and 25.0.
The tokens are placeholder text.

The decode's p is not the share of blocks in use but, as Dynamo 1.6.1's mocker times it, the contexts
of the sequences sampling in the step summed (a prefix two of them share counts twice) over the whole
cache, capped at 1: measured on its mocker, two requests decoding 400 tokens each over one cached
30k-token prefix take 13.5 s (p = 0.92; the blocks in use, p = 0.46, would give 10.1 s), three over a
40k-token prefix 10.4 s (p capped at 1: uncapped, 1.83 would give 5.4 s). Contexts are counted in
whole blocks (a sequence's block table), so p stays put while decodes fill their last blocks.

With a host tier, a step onboards the blocks its admissions found on the host: `TransferModel` times
the copy over the host link. By default (`EngineConfig.onboarding` "async", engines/onboarding.py)
only those sequences wait for it, the step does not; "sync", the step computes after it (the attention
of those sequences reads the copied KV); "layerwise", layer by layer beside the compute (the longer of
the two, plus one layer of the shorter; `TransferModel.num_layers`, 32). Offloads
are free here: a GPU runs them on a copy stream beside the compute, and a PCIe
link carries both directions at full speed at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from engines.runner import ScheduledChunk
from router.chat import ByteTokenizer, Tokenizer

PLACEHOLDER_TEXT = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "


# KV bytes per token of Llama-3.1-8B (32 layers x 8 KV heads x 128 dims x K and V x 2 bytes, bf16;
# its config.json), a common model behind the Dynamo mocker's timing
DEFAULT_NUM_LAYERS = 32
DEFAULT_KV_BYTES_PER_TOKEN = DEFAULT_NUM_LAYERS * 8 * 128 * 2 * 2
# PCIe Gen5 x16: 64 GB/s raw per direction, ~50 GB/s effective for large pinned-memory copies
# (NVIDIA's H100 PCIe figures; the nvbandwidth tool measures 50-55 GB/s host to device)
DEFAULT_HOST_BANDWIDTH_GBPS = 50.0


class TransferModel(msgspec.Struct, frozen=True):
    """Seconds to copy KV blocks over the host link: bytes per block / bandwidth."""

    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    bandwidth_gbps: float = DEFAULT_HOST_BANDWIDTH_GBPS  # GB/s (1e9 bytes)
    num_layers: int = DEFAULT_NUM_LAYERS  # a layer-wise copy overlaps each layer with the one before

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 1 or not self.bandwidth_gbps > 0 or self.num_layers < 1:
            raise ValueError("the host link needs a positive KV size per token, bandwidth and layer count")

    def seconds(self, num_blocks: int, block_size: int) -> float:
        return num_blocks * block_size * self.kv_bytes_per_token / (self.bandwidth_gbps * 1e9)


def prefill_ms(new_tokens: int) -> float:
    return 4.209989e-7 * new_tokens * new_tokens + 1.518344e-2 * new_tokens + 16.50142


def decode_ms(kv_usage: float) -> float:
    return max(1.0, -25.74 * kv_usage * kv_usage + 54.01 * kv_usage + 5.74)


class MockRunner:
    model_name = "mock"
    reads_token_ids = False  # only how many: the engine need not copy a step's tokens for it
    models_step_time = True  # the Dynamo mocker's timing, not the (near-zero) time it takes to run

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        speedup: float = 1.0,
        tokenizer: Tokenizer | None = None,
        eos_after: int | None = None,
        transfer: TransferModel | None = None,
    ) -> None:
        """`eos_after`: emit the tokenizer's EOS as output token number `eos_after` (never when None)."""
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.speedup = speedup
        self.tokenizer = tokenizer or ByteTokenizer()
        self.eos_after = eos_after
        self.transfer = transfer or TransferModel()
        self._placeholder = self.tokenizer.encode(PLACEHOLDER_TEXT)

    def execute(self, chunks: Sequence[ScheduledChunk]) -> list[int | None]:
        placeholder = self._placeholder
        out: list[int | None] = []
        for chunk in chunks:
            if not chunk.sample:
                out.append(None)
            else:
                position = chunk.output_len + chunk.sampling.output_offset  # in the whole answer
                if self.eos_after is not None and position >= self.eos_after:
                    out.append(self.tokenizer.eos_token_id)
                else:
                    out.append(placeholder[position % len(placeholder)])
        return out

    @property
    def num_layers(self) -> int:
        return self.transfer.num_layers

    @property
    def host_block_ms(self) -> float:
        """One block's onboarding time over the modelled host link, in ms."""
        return 1000.0 * self.transfer.seconds(1, self.block_size) / self.speedup

    def copy_blocks(self, offloads: list[tuple[int, int]], onboards: list[tuple[int, int]]) -> float:
        return self.transfer.seconds(len(onboards), self.block_size) / self.speedup

    def step_time_s(self, chunks: Sequence[ScheduledChunk], kv_usage: float) -> float:
        """The modelled step; `kv_usage` (the blocks in use) is not read (the module docstring)."""
        new_tokens = 0
        decoding = False
        context_blocks = 0  # of the sampling sequences, each counted whole
        for chunk in chunks:
            size = chunk.size()
            if chunk.sample:
                decoding = True
                context_blocks += len(chunk.block_table)
            if not (chunk.output_len and size == 1):
                new_tokens += size
        ms = prefill_ms(new_tokens) if new_tokens else 0.0
        return ms / 1000.0 / self.speedup + (self.decode_pass_s(context_blocks) if decoding else 0.0)

    def decode_pass_s(self, context_blocks: int) -> float:
        """The decode pass of sequences whose block tables hold `context_blocks` blocks in all: the part
        of a step its outputs leave before (the module docstring)."""
        return decode_ms(min(1.0, context_blocks / self.num_blocks)) / 1000.0 / self.speedup
