"""A model runner that computes nothing and takes the time the Dynamo mocker says a GPU would.

Prefill ms = 4.209989e-7·t² + 1.518344e-2·t + 16.50142 for the t new tokens in the batch; decode ms
per step = max(1, -25.74·p² + 54.01·p + 5.74) at KV usage p (`lib/mocker/src/common/perf_model.rs`).
A step with both pays both. `speedup` divides the modelled time. The tokens are placeholder text.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.runner import ScheduledChunk
from router.chat import ByteTokenizer, Tokenizer

PLACEHOLDER_TEXT = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "


def prefill_ms(new_tokens: int) -> float:
    return 4.209989e-7 * new_tokens * new_tokens + 1.518344e-2 * new_tokens + 16.50142


def decode_ms(kv_usage: float) -> float:
    return max(1.0, -25.74 * kv_usage * kv_usage + 54.01 * kv_usage + 5.74)


class MockRunner:
    model_name = "mock"
    reads_token_ids = False  # only how many: the engine need not copy a step's tokens for it

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        speedup: float = 1.0,
        tokenizer: Tokenizer | None = None,
        eos_after: int | None = None,
    ) -> None:
        """`eos_after`: emit the tokenizer's EOS as output token number `eos_after` (never when None)."""
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.speedup = speedup
        self.tokenizer = tokenizer or ByteTokenizer()
        self.eos_after = eos_after
        self._placeholder = self.tokenizer.encode(PLACEHOLDER_TEXT)

    def execute(self, chunks: Sequence[ScheduledChunk]) -> list[int | None]:
        placeholder = self._placeholder
        out: list[int | None] = []
        for chunk in chunks:
            if not chunk.sample:
                out.append(None)
            elif self.eos_after is not None and chunk.output_len >= self.eos_after:
                out.append(self.tokenizer.eos_token_id)
            else:
                out.append(placeholder[chunk.output_len % len(placeholder)])
        return out

    def step_time_s(self, chunks: Sequence[ScheduledChunk], kv_usage: float) -> float:
        new_tokens = 0
        decoding = False
        for chunk in chunks:
            size = chunk.size()
            if chunk.output_len and size == 1:
                decoding = True
            else:
                new_tokens += size
        ms = prefill_ms(new_tokens) if new_tokens else 0.0
        if decoding:
            ms += decode_ms(kv_usage)
        return ms / 1000.0 / self.speedup
