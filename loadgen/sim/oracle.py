"""The physical limits a policy is measured against.

- oracle hit rate: the prompt tokens an infinite single cache would hold (every block any earlier
  request computed), over all prompt tokens, with the engine's own rule that at least one token of
  each prompt is computed;
- ideal TTFT: each request's prefill of only its non-oracle tokens, alone on an idle worker (chunked
  by the step token budget, timed by the mock runner's model), with no queue at all.
"""

from __future__ import annotations

from itertools import islice, takewhile

import msgspec

from engines.mock import prefill_ms
from loadgen.sim.workload import Workload


class OracleFigures(msgspec.Struct):
    oracle_hit_rate: float
    ideal_ttft_mean_ms: float


def ideal_ttft_ms(new_tokens: int, max_num_batched_tokens: int) -> float:
    """Chunked prefill of `new_tokens` on an idle worker; the last chunk samples the first token."""
    full, rest = divmod(max(new_tokens, 1), max_num_batched_tokens)
    ms = full * prefill_ms(max_num_batched_tokens)
    return ms + prefill_ms(rest) if rest else ms


def oracle_figures(workload: Workload, max_num_batched_tokens: int = 8192) -> OracleFigures:
    seen: set[int] = set()
    block = workload.block_size
    cached = prompt = 0
    ttft_sum = 0.0
    rows = workload.arrival_order()
    for row in rows:
        hashes = workload.block_hashes(row)
        limit = (row.input_length - 1) // block
        hits = len(list(takewhile(seen.__contains__, islice(hashes, limit))))  # a C loop: 2k blocks a row
        seen.update(hashes)
        hit_tokens = hits * block
        cached += hit_tokens
        prompt += row.input_length
        ttft_sum += ideal_ttft_ms(row.input_length - hit_tokens, max_num_batched_tokens)
    return OracleFigures(
        oracle_hit_rate=round(cached / prompt, 5) if prompt else 0.0,
        ideal_ttft_mean_ms=round(ttft_sum / len(rows), 3) if rows else 0.0,
    )
