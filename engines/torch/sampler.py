"""Next-token sampling: greedy at temperature 0, else temperature and top-p.

A request with a seed samples from a generator seeded by (seed, tokens generated so far), so its
output is reproducible whatever it is batched with and however its prompt was chunked or cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engines.runner import SamplingParams

_MASK63 = (1 << 63) - 1
# Below this, logits / temperature overflows float32 and softmax gives NaN; the limit is greedy anyway.
MIN_TEMPERATURE = 1e-5


def position_seed(seed: int, output_len: int) -> int:
    # Multiplying by an odd 64-bit constant spreads consecutive seeds apart before adding the position.
    return (seed * 0x9E3779B97F4A7C15 + output_len) & _MASK63


class Sampler:
    def __init__(self, seed: int) -> None:
        # Serves requests without a seed: reproducible per runner, not per request.
        self._generator = torch.Generator().manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], output_lens: Sequence[int]
    ) -> list[int]:
        """One token per row of `logits` ([N, vocab], float32)."""
        greedy = logits.argmax(dim=-1).tolist()
        random_rows = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
        if not random_rows:
            return greedy
        rows = logits[random_rows].cpu()
        temperature = torch.tensor([params[i].temperature for i in random_rows]).unsqueeze(1)
        top_p = torch.tensor([params[i].top_p for i in random_rows]).unsqueeze(1)
        probs = _top_p_filter(torch.softmax(rows / temperature, dim=-1), top_p)
        for row, i in enumerate(random_rows):
            seed = params[i].seed
            generator = (
                self._generator
                if seed is None
                else torch.Generator().manual_seed(position_seed(seed, output_lens[i]))
            )
            greedy[i] = int(torch.multinomial(probs[row], 1, generator=generator))
        return greedy


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = mass_before >= top_p
    drop[:, 0] = False  # the most likely token always stays, even at top_p 0
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)
